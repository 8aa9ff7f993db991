//! Link SPECs: where a guest's link to its appliance goes (docs/CONFIG.md,
//! `link`): `serial:/dev/ttyS0`, `tcp:HOST:PORT`, `tcp-listen:ADDR:PORT`,
//! `vsock:CID:PORT`, `vsock-listen:PORT`, `unix:PATH`, each with an optional
//! `,sync=on|off`. The one list of link schemes; opening them is the
//! runtime's job.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// The schemes a SPEC may start with.
pub const SCHEMES: [&str; 6] = [
    "serial",
    "tcp",
    "tcp-listen",
    "vsock",
    "vsock-listen",
    "unix",
];

/// Where a link goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A serial device whose other end is a hypervisor network serial port.
    Serial(PathBuf),
    /// Connect over TCP (and retry with backoff).
    Tcp(String),
    /// Listen on TCP and serve one appliance at a time.
    TcpListen(SocketAddr),
    /// Connect over vsock.
    Vsock { cid: u32, port: u32 },
    /// Listen on vsock.
    VsockListen { port: u32 },
    /// Connect to a unix socket.
    Unix(PathBuf),
}

/// A parsed link SPEC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    pub endpoint: Endpoint,
    /// Run link sync before SSH (default on for `serial:` and `tcp:`).
    pub sync: bool,
}

impl FromStr for LinkSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("link {spec:?}: {why}");
        let (main, opts) = match spec.split_once(',') {
            Some((m, o)) => (m, Some(o)),
            None => (spec, None),
        };
        let (scheme, rest) = main
            .split_once(':')
            .ok_or_else(|| bad("expected SCHEME:ADDRESS"))?;
        let port = |s: &str| s.parse::<u32>().map_err(|_| bad("port is not a number"));
        let endpoint = match scheme {
            "serial" if !rest.is_empty() => Endpoint::Serial(rest.into()),
            "tcp" => {
                let (host, p) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
                if host.is_empty() || p.parse::<u16>().is_err() {
                    return Err(bad("expected tcp:HOST:PORT"));
                }
                Endpoint::Tcp(rest.into())
            }
            "tcp-listen" => Endpoint::TcpListen(
                rest.parse()
                    .map_err(|_| bad("expected tcp-listen:ADDR:PORT"))?,
            ),
            "vsock" => {
                let (cid, p) = rest
                    .split_once(':')
                    .ok_or_else(|| bad("expected vsock:CID:PORT"))?;
                Endpoint::Vsock {
                    cid: cid.parse().map_err(|_| bad("CID is not a number"))?,
                    port: port(p)?,
                }
            }
            "vsock-listen" => Endpoint::VsockListen { port: port(rest)? },
            "unix" if !rest.is_empty() => Endpoint::Unix(rest.into()),
            _ => {
                let known = SCHEMES.join(", ");
                return Err(bad(&format!("unknown scheme ({known})")));
            }
        };
        let mut sync = matches!(endpoint, Endpoint::Serial(_) | Endpoint::Tcp(_));
        if let Some(opts) = opts {
            for opt in opts.split(',') {
                match opt {
                    "sync=on" => sync = true,
                    "sync=off" => sync = false,
                    other => return Err(bad(&format!("unknown option {other:?} (sync=on|off)"))),
                }
            }
        }
        Ok(LinkSpec { endpoint, sync })
    }
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Serial(p) => write!(f, "serial:{}", p.display())?,
            Endpoint::Tcp(a) => write!(f, "tcp:{a}")?,
            Endpoint::TcpListen(a) => write!(f, "tcp-listen:{a}")?,
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}")?,
            Endpoint::VsockListen { port } => write!(f, "vsock-listen:{port}")?,
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display())?,
        }
        write!(f, ",sync={}", if self.sync { "on" } else { "off" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_sync_defaults_and_options() {
        let s: LinkSpec = "serial:/dev/ttyS0".parse().unwrap();
        assert_eq!(
            s,
            LinkSpec {
                endpoint: Endpoint::Serial("/dev/ttyS0".into()),
                sync: true
            }
        );
        let t: LinkSpec = "tcp:127.0.0.1:2377,sync=off".parse().unwrap();
        assert!(!t.sync);
        let l: LinkSpec = "tcp-listen:127.0.0.1:0".parse().unwrap();
        assert!(!l.sync);
        assert_eq!(
            "vsock:3:1024".parse::<LinkSpec>().unwrap().endpoint,
            Endpoint::Vsock { cid: 3, port: 1024 }
        );
        assert_eq!(
            "unix:/run/x.sock,sync=on"
                .parse::<LinkSpec>()
                .unwrap()
                .to_string(),
            "unix:/run/x.sock,sync=on"
        );
        for bad in [
            "nope",
            "tcp:host",
            "tcp::1",
            "tcp-listen:here",
            "vsock:x:1",
            "serial:",
            "tcp:h:1,sync=maybe",
        ] {
            assert!(bad.parse::<LinkSpec>().is_err(), "{bad}");
        }
    }
}
