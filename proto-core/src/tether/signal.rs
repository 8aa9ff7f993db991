//! The one table of signal names: SSH carries signals by name without "SIG"
//! (RFC 4254 6.9, 6.10), users type names or numbers, and the guest's kernel
//! wants Linux numbers. Real-time signals are named `RTMIN+n`.

use std::fmt;

/// Linux numbers 1..=31, in order.
const NAMES: [&str; 31] = [
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
    "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
];

/// glibc's SIGRTMIN (the kernel's 32 and 33 are reserved for the C library).
const RTMIN: i32 = 34;
/// The highest Linux signal number.
const MAX: i32 = 64;

/// A Linux signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signal(i32);

impl Signal {
    pub const HUP: Signal = Signal(1);
    pub const INT: Signal = Signal(2);
    pub const QUIT: Signal = Signal(3);
    pub const KILL: Signal = Signal(9);
    pub const USR1: Signal = Signal(10);
    pub const USR2: Signal = Signal(12);
    pub const TERM: Signal = Signal(15);
    pub const CONT: Signal = Signal(18);
    pub const STOP: Signal = Signal(19);

    /// The signal with Linux number `n`, if there is one.
    pub fn from_number(n: i32) -> Option<Signal> {
        let named = (1..=NAMES.len() as i32).contains(&n);
        (named || (RTMIN..=MAX).contains(&n)).then_some(Signal(n))
    }

    /// A signal from what a user or a peer wrote: a name with or without
    /// "SIG" in any case (`TERM`, `SIGterm`, `RTMIN+2`) or a number (`15`).
    pub fn parse(text: &str) -> Option<Signal> {
        let upper = text.trim().to_ascii_uppercase();
        if let Ok(n) = upper.parse::<i32>() {
            return Signal::from_number(n);
        }
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        if let Some(n) = name.strip_prefix("RTMIN+") {
            return n
                .parse::<i32>()
                .ok()
                .and_then(|n| Signal::from_number(RTMIN.checked_add(n)?));
        }
        if name == "RTMIN" {
            return Some(Signal(RTMIN));
        }
        NAMES
            .iter()
            .position(|&known| known == name)
            .map(|i| Signal(i as i32 + 1))
    }

    /// The Linux number.
    pub fn number(self) -> i32 {
        self.0
    }

    /// The name as SSH carries it: without "SIG" (`TERM`, `RTMIN+2`).
    pub fn name(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match NAMES.get((self.0 - 1) as usize) {
            Some(name) if self.0 >= 1 => f.write_str(name),
            _ => write!(f, "RTMIN+{}", self.0 - RTMIN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_prefixes_agree() {
        for text in ["TERM", "SIGTERM", "term", " SigTerm ", "15"] {
            assert_eq!(Signal::parse(text), Some(Signal::TERM), "{text}");
        }
        assert_eq!(Signal::parse("RTMIN+2").map(Signal::number), Some(36));
        assert_eq!(Signal::parse("SIGRTMIN").map(Signal::number), Some(34));
        assert_eq!(
            Signal::parse("64").map(|s| s.name()),
            Some("RTMIN+30".into())
        );
        for n in 1..=31 {
            let s = Signal::from_number(n).unwrap();
            assert_eq!(Signal::parse(&s.name()), Some(s));
        }
    }

    #[test]
    fn unknown_signals_are_refused() {
        for text in [
            "", "NOPE", "0", "32", "33", "65", "-1", "RTMIN+31", "RTMIN+-1", "SIG",
        ] {
            assert_eq!(Signal::parse(text), None, "{text:?}");
        }
    }
}
