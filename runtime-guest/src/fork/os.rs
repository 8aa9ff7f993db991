//! The kernel side of a child's recovery: reseeding the random pool, stepping
//! the clock from the RTC, and finding the vmgenid driver's reseed in the
//! kernel log.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::libc;
use tracing::{info, warn};

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// `RTC_RD_TIME`: `_IOR('p', 0x09, struct rtc_time)`.
const RTC_RD_TIME: libc::c_ulong = 0x8024_7009;

/// The kernel's line when vmgenid saw a new generation id (not ABI: only
/// logged as a confirmation).
pub const VMGENID_RESEED: &str = "crng reseeded due to virtual machine fork";

fn ioctl<T>(file: &File, request: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: `arg` points at the structure `request` expects (or is null
    // for requests that take none), alive for the call.
    match unsafe { libc::ioctl(file.as_raw_fd(), request as _, arg) } {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// `struct rand_pool_info` with a 32-byte buffer.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; 32],
}

/// Mixes `nonce` into the kernel's pool, crediting its 256 bits, then makes
/// the CRNG reseed at once, so nothing random in the child repeats the
/// parent's (or a sibling's).
pub fn reseed(urandom: &Path, nonce: Option<&[u8; 32]>) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(urandom)?;
    if let Some(nonce) = nonce {
        let mut pool = PoolInfo {
            entropy_count: 256,
            buf_size: 32,
            buf: *nonce,
        };
        ioctl(&file, RNDADDENTROPY, &mut pool).map_err(|e| ctx("RNDADDENTROPY", e))?;
    }
    ioctl::<()>(&file, RNDRESEEDCRNG, std::ptr::null_mut()).map_err(|e| ctx("RNDRESEEDCRNG", e))
}

fn ctx(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// `struct rtc_time`.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct RtcTime {
    pub sec: libc::c_int,
    pub min: libc::c_int,
    pub hour: libc::c_int,
    pub mday: libc::c_int,
    /// 0-11.
    pub mon: libc::c_int,
    /// Years since 1900.
    pub year: libc::c_int,
    pub wday: libc::c_int,
    pub yday: libc::c_int,
    pub isdst: libc::c_int,
}

impl RtcTime {
    /// Seconds since the epoch, the RTC keeping UTC (as QEMU's does).
    pub fn unix_seconds(&self) -> i64 {
        let y = i64::from(self.year) + 1900;
        let m = i64::from(self.mon) + 1;
        let d = i64::from(self.mday);
        // Days from civil (Howard Hinnant's algorithm).
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400 + i64::from(self.hour) * 3600 + i64::from(self.min) * 60 + i64::from(self.sec)
    }
}

fn read_rtc(rtc: &File) -> io::Result<i64> {
    let mut t = RtcTime::default();
    ioctl(rtc, RTC_RD_TIME, &mut t).map_err(|e| ctx("RTC_RD_TIME", e))?;
    Ok(t.unix_seconds())
}

fn set_realtime(seconds: i64, nanos: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: seconds as libc::time_t,
        tv_nsec: nanos as _,
    };
    // SAFETY: a valid timespec, read by the call.
    match unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } {
        0 => Ok(()),
        _ => Err(ctx("clock_settime", io::Error::last_os_error())),
    }
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The RTC, opened once and shared: `/dev/rtc0` admits one opener, and a
/// refinement still waiting for the RTC's update (a second fork within a
/// second of the first, or a thread the parent left running that the child
/// inherited) must not make the next step fail with EBUSY.
static RTC: Mutex<Option<Arc<File>>> = Mutex::new(None);
/// Counts clock steps: a refinement started by an earlier step gives way.
static STEPS: AtomicU64 = AtomicU64::new(0);

fn rtc(path: &Path) -> io::Result<Arc<File>> {
    let mut rtc = RTC.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(file) = rtc.as_ref() {
        return Ok(file.clone());
    }
    let file = Arc::new(File::open(path)?);
    *rtc = Some(file.clone());
    Ok(file)
}

/// Steps the wall clock from the RTC: at once to the second it shows plus
/// 0.5 s (the RTC counts whole seconds, so that is at most 0.5 s off), then,
/// in the background, to the exact second at the RTC's next update. Returns
/// by how many seconds the clock moved.
pub fn step_clock(rtc_path: &Path) -> io::Result<f64> {
    let rtc = rtc(rtc_path)?;
    let step = STEPS.fetch_add(1, Ordering::SeqCst) + 1;
    let seconds = read_rtc(&rtc)?;
    let before = now_seconds();
    set_realtime(seconds, 500_000_000)?;
    let spawned =
        std::thread::Builder::new()
            .name("rtc-refine".into())
            .spawn(move || match refine(&rtc, step) {
                Ok(Some(off)) => {
                    info!("fork: clock refined at the RTC's update (off by {off:+.3} s)")
                }
                Ok(None) => info!("fork: clock refinement superseded by a later step"),
                Err(e) => warn!("fork: clock not refined at the RTC's update: {e}"),
            });
    if let Err(e) = spawned {
        warn!("fork: clock not refined: {e}");
    }
    Ok(seconds as f64 + 0.5 - before)
}

/// Waits for the RTC's next update by reading it every 10 ms until the
/// second changes by one, and sets the clock to that exact second. Returns
/// how far the half-second guess was off, or `None` when a later step
/// started meanwhile (this thread may be a parent's, running on in a child).
/// A jump of more than a second is not an update (the VM was paused or
/// forked between two reads): the wait starts over. (Not with the RTC's
/// update interrupt, `RTC_UIE_ON`: in a QEMU child that left the processes'
/// timers stalled.)
fn refine(rtc: &File, step: u64) -> io::Result<Option<f64>> {
    let mut last = read_rtc(rtc)?;
    for _ in 0..150 {
        std::thread::sleep(Duration::from_millis(10));
        if STEPS.load(Ordering::SeqCst) != step {
            return Ok(None);
        }
        let now = read_rtc(rtc)?;
        if now == last + 1 {
            let off = now_seconds() - now as f64;
            set_realtime(now, 0)?;
            return Ok(Some(off));
        }
        last = now;
    }
    Err(io::Error::other("the RTC did not tick within 1.5 s"))
}

/// How many times the kernel log says vmgenid reseeded for a fork (reads
/// what `/dev/kmsg` holds now; never waits).
pub fn vmgenid_reseeds(kmsg: &Path) -> io::Result<usize> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(kmsg)?;
    let mut count = 0;
    let mut record = vec![0u8; 8192];
    loop {
        match f.read(&mut record) {
            Ok(0) => return Ok(count),
            Ok(n) => {
                if String::from_utf8_lossy(&record[..n]).contains(VMGENID_RESEED) {
                    count += 1;
                }
            }
            // Overwritten records: go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(count),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtc_time_converts_to_unix_seconds() {
        let t = |year, mon, mday, hour, min, sec| RtcTime {
            year: year - 1900,
            mon: mon - 1,
            mday,
            hour,
            min,
            sec,
            ..Default::default()
        };
        assert_eq!(t(1970, 1, 1, 0, 0, 0).unix_seconds(), 0);
        assert_eq!(t(2000, 2, 29, 12, 0, 1).unix_seconds(), 951_825_601);
        assert_eq!(t(2026, 12, 3, 9, 5, 39).unix_seconds(), 1_796_288_739);
    }

    /// The ioctl numbers are right: the kernel takes them (root only; the
    /// host's pool just gets 32 more bytes mixed in).
    #[test]
    fn the_random_pool_takes_the_nonce_and_reseeds() {
        let root = nix::unistd::geteuid().is_root();
        let check = if root {
            Ok(())
        } else {
            Err("not root".to_string())
        };
        if e2e::available("random pool reseed test", check).is_none() {
            return;
        }
        reseed("/dev/urandom".as_ref(), Some(&[7; 32])).unwrap();
        reseed("/dev/urandom".as_ref(), None).unwrap();
        // Not a random device: the error names the request.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("urandom");
        std::fs::write(&file, b"").unwrap();
        let e = reseed(&file, None).unwrap_err();
        assert!(e.to_string().contains("RNDRESEEDCRNG"), "{e}");
    }

    #[test]
    fn the_rtc_is_opened_once_and_shared() {
        // /dev/rtc0 admits one opener: a second step (or a refinement still
        // waiting) must reuse the first handle, never open it again.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rtc");
        std::fs::write(&path, b"").unwrap();
        let first = rtc(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let second = rtc(&path).expect("the open handle, not a second open");
        assert!(Arc::ptr_eq(&first, &second));
    }

    #[test]
    fn the_kernel_log_is_read_without_waiting() {
        // A regular file stands in for /dev/kmsg: records, then the end.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kmsg");
        std::fs::write(&p, format!("6,1,2,-;random: {VMGENID_RESEED}\n")).unwrap();
        // A file reads as one record here; the line is found.
        assert_eq!(vmgenid_reseeds(&p).unwrap(), 1);
        std::fs::write(&p, "6,1,2,-;something else\n").unwrap();
        assert_eq!(vmgenid_reseeds(&p).unwrap(), 0);
    }
}
