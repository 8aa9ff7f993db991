//! Gives back the resident code tether needed to start but does not run while
//! it idles.
//!
//! Most of an idle tether's resident memory is not memory it allocated: it is
//! its own code and read-only data, and the C library's. Start-up (the config,
//! the OS configuration, the SSH key exchange) leaves nearly all of the text
//! resident, because the kernel maps file pages around each page fault
//! ("fault-around", 64 KiB windows), although an idle link runs a small part
//! of it. Once serving has begun, and again whenever the code grew back and
//! tether is quiet, [`trim`] unmaps those pages (`madvise(MADV_DONTNEED)`) and
//! cuts each mapping into [`WINDOW`]-sized pieces, so that what runs next
//! faults back in (a minor fault, from the page cache) in windows of that
//! size rather than 64 KiB. (Fault-around never crosses a mapping's end; the
//! pieces alternate between the `MADV_NORMAL` and `MADV_RANDOM` read-ahead
//! hints, which only matter for a page not in the page cache, so that the
//! kernel cannot merge them back.)
//!
//! What this does and does not save: the pages stay in the page cache (in a
//! VM the initramfs is itself memory, so the binary's pages are not freed);
//! it lowers tether's own resident set (`VmRSS`, what a cgroup or `ps`
//! charges to it) and leaves the cache free to reclaim those pages on a host.
//! It costs a few hundred more mappings (kernel memory, about 200 bytes
//! each) and more, smaller page faults after a trim. Anonymous memory (heap,
//! stacks, relocated data) is never touched: only read-only, private,
//! file-backed mappings that hold no anonymous (copied-on-write) page, which
//! `MADV_DONTNEED` drops without losing anything.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::time::Duration;

use nix::sys::mman::{MmapAdvise, madvise};
use smol::Timer;
use tracing::{debug, warn};

/// How long after serving starts the first trim runs.
const FIRST_TRIM: Duration = Duration::from_secs(1);

/// How often tether looks whether its code grew back.
const CHECK_EVERY: Duration = Duration::from_secs(10);

/// File-backed resident growth since the last trim that is worth another
/// one (a key exchange, a burst of output, a new session).
const REGROWN: u64 = 256 * 1024;

/// Page faults in one check period below which tether counts as quiet.
const QUIET_FAULTS: i64 = 64;

/// The size of the pieces trimmed mappings are cut into: at most this much
/// is mapped per page fault afterwards.
pub const WINDOW: usize = 16 * 1024;

/// A read-only, private, file-backed mapping with no anonymous page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start: usize,
    pub end: usize,
    /// Resident bytes.
    pub rss: u64,
}

/// What one trim gave back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Mappings trimmed (after the first trim, the pieces of the originals).
    pub regions: usize,
    /// Resident bytes those mappings held.
    pub bytes: u64,
}

/// Trims while the guest serves: once start-up is over, then whenever the
/// file-backed resident set grew by [`REGROWN`] and tether was quiet for a
/// check period.
pub async fn when_idle() {
    Timer::after(FIRST_TRIM).await;
    let mut baseline = trim_and_log();
    let mut faults = minor_faults();
    loop {
        Timer::after(CHECK_EVERY).await;
        let now = minor_faults();
        let quiet = now - faults < QUIET_FAULTS;
        faults = now;
        match file_resident() {
            Ok(rss) if quiet && rss > baseline.saturating_add(REGROWN) => {
                baseline = trim_and_log();
                faults = minor_faults();
            }
            Ok(_) => {}
            Err(e) => {
                warn!("cannot read /proc/self/statm: {e}; resident code is no longer trimmed");
                return;
            }
        }
    }
}

/// Trims and logs what it gave back; returns the file-backed resident bytes
/// after it, the baseline for regrowth.
fn trim_and_log() -> u64 {
    match trim() {
        Ok(t) => debug!(
            "trimmed {} KiB of resident code and read-only data in {} mappings",
            t.bytes / 1024,
            t.regions
        ),
        Err(e) => warn!("cannot trim resident code: {e}"),
    }
    file_resident().unwrap_or(u64::MAX)
}

/// Unmaps the resident pages of every read-only, private, file-backed
/// mapping that holds no anonymous page, and cuts it into [`WINDOW`] pieces
/// (see the module docs).
pub fn trim() -> io::Result<Trimmed> {
    // Read line by line: on a later trim the file lists hundreds of pieces,
    // and one string of it all would grow the heap that is being trimmed.
    let smaps = BufReader::with_capacity(4096, File::open("/proc/self/smaps")?);
    let mut found = Vec::new();
    let mut parser = Parser::default();
    for line in smaps.lines() {
        if let Some(region) = parser.line(&line?) {
            found.push(region);
        }
    }
    found.extend(parser.finish());
    let mut trimmed = Trimmed::default();
    for region in found {
        // SAFETY (both calls): the range lies in one mapping that is
        // read-only, private, backed by a file and holds no anonymous page,
        // so dropping its pages loses nothing (the file gives them back
        // unchanged) and the read-ahead hint changes no contents.
        unsafe { advise(region.start, region.end, MmapAdvise::MADV_DONTNEED) }?;
        for (start, end, advice) in pieces(region.start, region.end) {
            unsafe { advise(start, end, advice) }?;
        }
        trimmed.regions += 1;
        trimmed.bytes += region.rss;
    }
    release_free_heap();
    Ok(trimmed)
}

/// Gives the C allocator's free memory back to the kernel (glibc keeps
/// freed heap and arena pages resident; a burst of output leaves them).
fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory; it takes the allocator's
    // locks like any malloc call.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// `madvise` over `start..end`.
///
/// # Safety
/// As `madvise`: the advice must not discard memory anything still needs.
unsafe fn advise(start: usize, end: usize, advice: MmapAdvise) -> io::Result<()> {
    let Some(addr) = std::ptr::NonNull::new(start as *mut std::ffi::c_void) else {
        return Ok(());
    };
    // SAFETY: the caller's.
    unsafe { madvise(addr, end - start, advice) }.map_err(io::Error::from)
}

/// The [`WINDOW`]-aligned pieces of `start..end` with their read-ahead hint,
/// alternating by address so that neighbours differ, whichever mapping (or
/// earlier piece) they are cut from.
pub fn pieces(start: usize, end: usize) -> impl Iterator<Item = (usize, usize, MmapAdvise)> {
    let first = start / WINDOW;
    let last = end.div_ceil(WINDOW);
    (first..last).map(move |i| {
        let advice = if i % 2 == 1 {
            MmapAdvise::MADV_RANDOM
        } else {
            MmapAdvise::MADV_NORMAL
        };
        ((i * WINDOW).max(start), ((i + 1) * WINDOW).min(end), advice)
    })
}

/// Reads `/proc/self/smaps` a line at a time and yields the trimmable
/// mappings with resident pages: permissions `r--p` or `r-xp`, a file
/// (a path and an inode), and `Anonymous: 0 kB`.
#[derive(Debug, Default)]
pub struct Parser {
    /// The mapping being read, if it is a candidate, and whether its
    /// `Anonymous:` line said 0.
    current: Option<(Region, bool)>,
}

impl Parser {
    /// Takes one line; returns the previous mapping when this line starts a
    /// new one and the previous one is trimmable.
    pub fn line(&mut self, line: &str) -> Option<Region> {
        if let Some(candidate) = header(line) {
            let done = self.finish();
            self.current = candidate.map(|r| (r, false));
            return done;
        }
        let (region, clean) = self.current.as_mut()?;
        if let Some(kb) = kb_field(line, "Rss:") {
            region.rss = kb * 1024;
        } else if let Some(kb) = kb_field(line, "Anonymous:") {
            *clean = kb == 0;
        }
        None
    }

    /// The last mapping, if it is trimmable.
    pub fn finish(&mut self) -> Option<Region> {
        match self.current.take() {
            Some((region, true)) if region.rss > 0 => Some(region),
            _ => None,
        }
    }
}

/// A mapping's header line: `None` for other lines, `Some(None)` for a
/// mapping that is not read-only, private and file-backed.
fn header(line: &str) -> Option<Option<Region>> {
    let mut parts = line.split_ascii_whitespace();
    let (start, end) = parts.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = parts.next()?;
    let inode = parts.nth(2)?;
    let path = parts.next();
    let candidate = matches!(perms, "r--p" | "r-xp")
        && inode != "0"
        && path.is_some_and(|p| p.starts_with('/'))
        && start < end;
    Some(candidate.then_some(Region { start, end, rss: 0 }))
}

/// The kB value of a `Name:   N kB` line.
fn kb_field(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// File-backed resident bytes (the third field of `/proc/self/statm`).
fn file_resident() -> io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_ascii_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "/proc/self/statm: no shared pages",
            )
        })?;
    Ok(pages * page_size())
}

fn page_size() -> u64 {
    use nix::unistd::{SysconfVar, sysconf};
    sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64)
}

/// Minor page faults of the process so far.
fn minor_faults() -> i64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0, |u| u.minor_page_faults())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0100000 r--p 00000000 fd:01 1234 /usr/bin/tether
Size:               1024 kB
Rss:                 192 kB
Anonymous:             0 kB
55d0a0100000-55d0a0400000 r-xp 00100000 fd:01 1234 /usr/bin/tether
Rss:                1472 kB
Anonymous:             0 kB
55d0a0400000-55d0a0419000 r--p 00400000 fd:01 1234 /usr/bin/tether
Rss:                 100 kB
Anonymous:           100 kB
55d0a0419000-55d0a041b000 rw-p 00419000 fd:01 1234 /usr/bin/tether
Rss:                   8 kB
Anonymous:             8 kB
55d0a1000000-55d0a1063000 rw-p 00000000 00:00 0 [heap]
Rss:                 312 kB
Anonymous:           312 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 99 /usr/lib/libc.so.6
Rss:                   0 kB
Anonymous:             0 kB
7f0000200000-7f0000202000 r-xp 00000000 00:00 0 [vdso]
Rss:                   4 kB
Anonymous:             0 kB
7f0000300000-7f0000301000 r--p 00000000 fd:01 98 /usr/lib/ld-linux-x86-64.so.2
Rss:                   4 kB
Anonymous:             0 kB
";

    fn parse(text: &str) -> Vec<Region> {
        let mut parser = Parser::default();
        let mut out: Vec<Region> = text.lines().filter_map(|l| parser.line(l)).collect();
        out.extend(parser.finish());
        out
    }

    #[test]
    fn only_clean_read_only_file_mappings_with_resident_pages_are_trimmed() {
        let found = parse(SMAPS);
        let starts: Vec<usize> = found.iter().map(|r| r.start).collect();
        // Not RELRO (anonymous pages), .data, the heap, an empty mapping
        // or the vDSO; the last mapping of the text counts too.
        assert_eq!(starts, [0x55d0a0000000, 0x55d0a0100000, 0x7f0000300000]);
        assert_eq!(found[1].rss, 1472 * 1024);
        assert_eq!(found[1].end, 0x55d0a0400000);
    }

    #[test]
    fn a_mapping_without_an_anonymous_line_is_not_trimmed() {
        let text =
            "55d0a0000000-55d0a0100000 r--p 00000000 fd:01 1234 /usr/bin/tether\nRss: 8 kB\n";
        assert!(parse(text).is_empty());
    }

    #[test]
    fn pieces_cover_the_range_and_alternate_by_address() {
        let start = 3 * WINDOW + 4096;
        let end = 6 * WINDOW + 8192;
        let p: Vec<_> = pieces(start, end).collect();
        assert_eq!(p.first().map(|x| x.0), Some(start));
        assert_eq!(p.last().map(|x| x.1), Some(end));
        assert!(p.windows(2).all(|w| w[0].1 == w[1].0 && w[0].2 != w[1].2));
        assert_eq!(p[0].2, MmapAdvise::MADV_RANDOM, "window 3 is odd");
        // Cutting a piece again gives the same hint: pieces never merge back.
        let again: Vec<_> = pieces(p[1].0, p[1].1).collect();
        assert_eq!(again, [p[1]]);
    }

    #[test]
    fn trimming_this_process_cuts_its_code_into_pieces_and_keeps_it_running() {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let before = parse(&smaps);
        assert!(
            !before.is_empty(),
            "a test binary has resident read-only file mappings"
        );
        let trimmed = trim().expect("trim");
        assert!(trimmed.regions > 0 && trimmed.bytes > 0);
        // Every mapping found before is now in pieces of at most one window
        // (another test may have trimmed first: then they were pieces already).
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        for line in maps.lines() {
            let Some(Some(m)) = header(line) else {
                continue;
            };
            if before.iter().any(|r| m.start < r.end && r.start < m.end) {
                assert!(m.end - m.start <= WINDOW, "not cut: {line}");
            }
        }
        // The code just dropped runs again (faulted back in), and a second
        // trim works on the pieces.
        trim().expect("second trim");
        assert!(file_resident().expect("statm") > 0);
    }
}
