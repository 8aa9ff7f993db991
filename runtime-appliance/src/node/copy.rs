//! Copying the files a fork's children start from: guest RAM (mostly holes:
//! only the pages the guest touched are data) and disk images. A copy is
//! sparse (SEEK_DATA/SEEK_HOLE: holes stay holes), or a reflink where the
//! filesystem shares extents (FICLONE: instant, copy-on-write).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

/// How a file was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// The filesystem shares the extents (copy-on-write).
    Reflink,
    /// The data regions were copied, `bytes` of them; holes stayed holes.
    Sparse { bytes: u64 },
}

fn create(dst: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
}

/// Copies `src` to a new file `dst` (mode 0600): a reflink when `reflink`
/// and the filesystem can, else a sparse copy.
pub fn copy(src: &Path, dst: &Path, reflink: bool) -> io::Result<Copied> {
    let from = File::open(src)?;
    let to = create(dst)?;
    let done = (|| {
        // SAFETY: FICLONE takes the source descriptor as its argument; both
        // descriptors are open for the duration of the call.
        if reflink
            && unsafe { nix::libc::ioctl(to.as_raw_fd(), nix::libc::FICLONE, from.as_raw_fd()) }
                == 0
        {
            return Ok(Copied::Reflink);
        }
        sparse(&from, &to)
    })();
    if done.is_err() {
        let _ = fs::remove_file(dst);
    }
    done
}

/// Copies the data regions of `from` into `to` (same size; holes stay holes).
fn sparse(from: &File, to: &File) -> io::Result<Copied> {
    let size = from.metadata()?.len();
    to.set_len(size)?;
    let mut bytes = 0;
    let mut at: i64 = 0;
    while (at as u64) < size {
        let data = match lseek(from, at, Whence::SeekData) {
            Ok(d) => d,
            Err(Errno::ENXIO) => break, // only a hole is left
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(from, data, Whence::SeekHole).map_err(io::Error::from)?;
        copy_range(from, to, data as u64, (hole - data) as u64)?;
        bytes += (hole - data) as u64;
        at = hole;
    }
    Ok(Copied::Sparse { bytes })
}

/// Copies `len` bytes at `offset` (in the kernel where it can).
fn copy_range(from: &File, to: &File, offset: u64, len: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (offset as i64, offset as i64);
    let end = offset + len;
    while (off_in as u64) < end {
        let want = ((end - off_in as u64) as usize).min(1 << 30);
        // SAFETY: both descriptors are open; the offsets are valid pointers
        // for the call's duration.
        let n = unsafe {
            nix::libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        match Errno::result(n) {
            Ok(0) => break,
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(Errno::EXDEV | Errno::ENOSYS | Errno::EINVAL | Errno::EOPNOTSUPP) => {
                return copy_by_hand(from, to, off_in as u64, end);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads and writes `[from_offset, end)`.
fn copy_by_hand(from: &File, to: &File, mut at: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while at < end {
        let want = ((end - at) as usize).min(buf.len());
        let n = from.read_at(&mut buf[..want], at)?;
        if n == 0 {
            break;
        }
        to.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_copies_its_data_and_keeps_its_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("ram");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(f);
        let dst = dir.path().join("copy");
        let copied = copy(&src, &dst, false).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        match copied {
            // Data regions are whole filesystem blocks; far less than the size.
            Copied::Sparse { bytes } => assert!(bytes < 8 << 20, "{bytes}"),
            other => panic!("{other:?}"),
        }
        let used = {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(&dst).unwrap().blocks() * 512
        };
        assert!(used < 8 << 20, "the copy has no holes: {used} bytes used");
        // The copy is new: an existing file is not overwritten.
        assert!(copy(&src, &dst, true).is_err());
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    }

    #[test]
    fn a_reflink_or_a_copy_has_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("disk.img");
        fs::write(&src, vec![3u8; 100_000]).unwrap();
        let dst = dir.path().join("child.img");
        copy(&src, &dst, true).unwrap();
        assert_eq!(fs::read(&dst).unwrap(), vec![3u8; 100_000]);
        assert!(copy(&dir.path().join("none"), &dir.path().join("x"), true).is_err());
    }
}
