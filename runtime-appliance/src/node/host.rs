//! The host's resources as a scheduler sees them: CPUs and memory.

use std::fs;

/// Host CPUs this process may use.
pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// (total, available) memory in MiB, from `/proc/meminfo`.
pub fn memory_mib() -> (u64, u64) {
    let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .unwrap_or(0)
    };
    (field("MemTotal"), field("MemAvailable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_in_mib() {
        let text = "MemTotal:       24683520 kB\nMemFree:        22673408 kB\nMemAvailable:   24012800 kB\n";
        assert_eq!(parse_meminfo(text), (24105, 23450));
        assert_eq!(parse_meminfo(""), (0, 0));
        assert!(cpus() >= 1);
    }
}
