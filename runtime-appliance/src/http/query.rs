//! Query-string and path parsing for the HTTP API: percent-decoding, strict
//! parameter checks (unknown or repeated parameters are errors naming them),
//! and the typed values the routes take.

use std::time::Duration;

use proto_core::tether::Signal;

use crate::api_types::From;
use crate::limits::MAX_CLIENT_WAIT;

use super::response::HttpError;

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`) into UTF-8.
pub fn percent_decode(raw: &str, plus_is_space: bool) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .ok_or_else(|| format!("truncated %-escape in {raw:?}"))?;
                let hex =
                    std::str::from_utf8(hex).map_err(|_| format!("bad %-escape in {raw:?}"))?;
                let byte = u8::from_str_radix(hex, 16)
                    .map_err(|_| format!("bad %-escape %{hex} in {raw:?}"))?;
                out.push(byte);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{raw:?} does not decode to UTF-8"))
}

/// A parsed query string: decoded `name=value` pairs in order.
#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Parses a raw query string (`None` when the URI has none).
    pub fn parse(raw: Option<&str>) -> Result<Self, HttpError> {
        let mut pairs = Vec::new();
        for part in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = part.split_once('=').unwrap_or((part, ""));
            let decode = |s| {
                percent_decode(s, true)
                    .map_err(|e| HttpError::bad_request(format!("bad query string: {e}")))
            };
            pairs.push((decode(name)?, decode(value)?));
        }
        Ok(Self { pairs })
    }

    /// Rejects parameters not in `known`, and repeats of those not in `repeatable`.
    pub fn check(&self, route: &str, known: &[&str], repeatable: &[&str]) -> Result<(), HttpError> {
        for (i, (name, _)) in self.pairs.iter().enumerate() {
            if !known.contains(&name.as_str()) {
                let known = if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                };
                return Err(HttpError::bad_request(format!(
                    "unknown query parameter {name:?} for {route} (known: {known})"
                )));
            }
            if !repeatable.contains(&name.as_str())
                && self.pairs[..i].iter().any(|(n, _)| n == name)
            {
                return Err(HttpError::bad_request(format!(
                    "query parameter {name:?} given more than once"
                )));
            }
        }
        Ok(())
    }

    /// The value of a parameter given once (see `check`).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a repeatable parameter, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A boolean: `1`, `true`, `yes`, `on` or an empty value (`?tty`) for
    /// true; `0`, `false`, `no`, `off` for false.
    pub fn bool(&self, name: &str, default: bool) -> Result<bool, HttpError> {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        match v.to_ascii_lowercase().as_str() {
            "" | "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(HttpError::bad_request(format!(
                "query parameter {name}={v:?} is not a boolean (use 1/true or 0/false)"
            ))),
        }
    }

    /// An unsigned integer.
    pub fn u64(&self, name: &str, default: u64) -> Result<u64, HttpError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                HttpError::bad_request(format!(
                    "query parameter {name}={v:?} is not an unsigned integer"
                ))
            }),
        }
    }

    /// An optional u32 (e.g. a terminal dimension).
    pub fn opt_u32(&self, name: &str) -> Result<Option<u32>, HttpError> {
        self.get(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    HttpError::bad_request(format!(
                        "query parameter {name}={v:?} is not an unsigned 32-bit integer"
                    ))
                })
            })
            .transpose()
    }

    /// A duration: humantime (`50s`, `1m30s`, `250ms`) or plain seconds (`50`),
    /// clamped to [`MAX_CLIENT_WAIT`] (24 h).
    pub fn duration(&self, name: &str, default: Duration) -> Result<Duration, HttpError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => parse_duration(v).map(|d| d.min(MAX_CLIENT_WAIT)).ok_or_else(|| {
                HttpError::bad_request(format!(
                    "query parameter {name}={v:?} is not a duration (e.g. 50s, 1m30s, 250ms, or seconds)"
                ))
            }),
        }
    }

    /// An output position: an offset, or `live`.
    pub fn from(&self, name: &str, default: From) -> Result<From, HttpError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) if v.eq_ignore_ascii_case("live") => Ok(From::Live),
            Some(v) => v.parse().map(From::Offset).map_err(|_| {
                HttpError::bad_request(format!(
                    "query parameter {name}={v:?} is neither an output offset nor \"live\""
                ))
            }),
        }
    }
}

/// Parses `50s`-style durations, and bare integers as seconds.
pub fn parse_duration(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    humantime::parse_duration(v).ok()
}

/// The canonical signal name (upper case, without `SIG`) for a name
/// (`TERM`, `SIGTERM`, `term`, `RTMIN+2`) or a number (`15`).
pub fn parse_signal(v: &str) -> Result<String, HttpError> {
    Signal::parse(v).map(Signal::name).ok_or_else(|| {
        HttpError::bad_request(format!(
            "unknown signal {v:?} (use a name such as TERM, SIGKILL, HUP, RTMIN+2, or a number 1-64)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(raw: &str) -> Query {
        Query::parse(Some(raw)).unwrap()
    }

    #[test]
    fn decodes_percent_and_plus() {
        let query = q("command=sh&command=-c&command=echo+hi%20there%21&x=%E2%9C%93");
        assert_eq!(query.all("command"), ["sh", "-c", "echo hi there!"]);
        assert_eq!(query.get("x"), Some("✓"));
        assert!(Query::parse(Some("a=%2")).is_err());
        assert!(Query::parse(Some("a=%zz")).is_err());
        assert!(
            Query::parse(Some("a=%ff"))
                .unwrap_err()
                .message
                .contains("UTF-8")
        );
        assert_eq!(percent_decode("a+b%2Fc", false).unwrap(), "a+b/c");
    }

    #[test]
    fn booleans() {
        let query = q("a=1&b=true&c=0&d=FALSE&e&f=maybe");
        assert!(query.bool("a", false).unwrap());
        assert!(query.bool("b", false).unwrap());
        assert!(!query.bool("c", true).unwrap());
        assert!(!query.bool("d", true).unwrap());
        assert!(query.bool("e", false).unwrap());
        assert!(query.bool("missing", true).unwrap());
        let err = query.bool("f", false).unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        assert!(err.message.contains("f=\"maybe\""), "{}", err.message);
    }

    #[test]
    fn unknown_and_repeated_parameters_are_rejected() {
        let query = q("stdin=1&stdn=1");
        let err = query.check("attach", &["stdin"], &[]).unwrap_err();
        assert!(err.message.contains("\"stdn\""), "{}", err.message);
        assert!(
            q("stdin=1&stdin=0")
                .check("attach", &["stdin"], &[])
                .is_err()
        );
        assert!(
            q("command=a&command=b")
                .check("exec", &["command"], &["command"])
                .is_ok()
        );
    }

    #[test]
    fn offsets_durations_and_numbers() {
        let query = q("from=live&f2=17&f3=abc&t=50s&t2=250ms&t3=7&t4=soon&n=12&n2=-1");
        assert_eq!(query.from("from", From::Offset(0)).unwrap(), From::Live);
        assert_eq!(query.from("f2", From::Live).unwrap(), From::Offset(17));
        assert!(
            query
                .from("f3", From::Live)
                .unwrap_err()
                .message
                .contains("\"abc\"")
        );
        assert_eq!(
            query.from("none", From::Offset(0)).unwrap(),
            From::Offset(0)
        );
        assert_eq!(
            query.duration("t", Duration::ZERO).unwrap(),
            Duration::from_secs(50)
        );
        assert_eq!(
            query.duration("t2", Duration::ZERO).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            query.duration("t3", Duration::ZERO).unwrap(),
            Duration::from_secs(7)
        );
        assert!(query.duration("t4", Duration::ZERO).is_err());
        // A huge timeout is clamped, never an overflow later.
        let huge = q("t=18446744073709551615&t2=100000000h");
        assert_eq!(huge.duration("t", Duration::ZERO).unwrap(), MAX_CLIENT_WAIT);
        assert_eq!(
            huge.duration("t2", Duration::ZERO).unwrap(),
            MAX_CLIENT_WAIT
        );
        assert_eq!(query.u64("n", 0).unwrap(), 12);
        assert!(query.u64("n2", 0).is_err());
        assert_eq!(query.opt_u32("n").unwrap(), Some(12));
        assert_eq!(query.opt_u32("nope").unwrap(), None);
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("TERM").unwrap(), "TERM");
        assert_eq!(parse_signal("SIGKILL").unwrap(), "KILL");
        assert_eq!(parse_signal("hup").unwrap(), "HUP");
        assert_eq!(parse_signal("15").unwrap(), "TERM");
        assert_eq!(parse_signal("36").unwrap(), "RTMIN+2");
        assert_eq!(parse_signal("RTMIN+2").unwrap(), "RTMIN+2");
        for bad in ["NOPE", "0", "32", "65", "", "RTMIN+40", "-9"] {
            let err = parse_signal(bad).unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{bad}");
        }
    }
}
