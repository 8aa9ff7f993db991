//! The config's `networks` entries: the JSON as written (`RawNetwork`) and the
//! validated form the configurator works from (`NicSpec`). Every error names
//! the field it is about (`networks[0].mac: not a MAC address: "zz"`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::Deserialize;

/// One `networks` entry as written (fields: docs/CONFIG.md, "Network").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub pci: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub neighbours: Vec<RawNeighbour>,
    #[serde(default)]
    pub dhcp: bool,
}

/// One `routes` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub to: String,
    #[serde(default)]
    pub via: Option<String>,
}

/// One `neighbours` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNeighbour {
    pub ip: String,
    pub mac: String,
}

/// A field that failed validation: `path` is e.g. `networks[0].mac`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or(())?;
            if part.len() != 2 {
                return Err(());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ())?;
        }
        if parts.next().is_some() {
            return Err(());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A PCI address `DDDD:BB:SS.F`, kept in the lower-case form sysfs uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PciAddr(String);

impl PciAddr {
    /// The form sysfs uses (`0000:00:03.0`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PciAddr {
    type Err = ();
    /// Accepts `DDDD:BB:SS.F` or `BB:SS.F` (domain 0).
    fn from_str(s: &str) -> Result<Self, ()> {
        let hex = |p: &str, len: usize, max: u32| {
            (p.len() == len)
                .then(|| u32::from_str_radix(p, 16).ok())
                .flatten()
                .filter(|v| *v <= max)
                .ok_or(())
        };
        let (head, func) = s.rsplit_once('.').ok_or(())?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, slot) = match parts[..] {
            [d, b, s] => (hex(d, 4, 0xffff)?, hex(b, 2, 0xff)?, hex(s, 2, 0x1f)?),
            [b, s] => (0, hex(b, 2, 0xff)?, hex(s, 2, 0x1f)?),
            _ => return Err(()),
        };
        let func = hex(func, 1, 7)?;
        Ok(PciAddr(format!(
            "{domain:04x}:{bus:02x}:{slot:02x}.{func:x}"
        )))
    }
}

impl fmt::Display for PciAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a NIC is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// By its Ethernet address.
    Mac(MacAddr),
    /// By the PCI function it sits on (`/sys/class/net/*/device`).
    Pci(PciAddr),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Mac(m) => write!(f, "mac {m}"),
            Selector::Pci(p) => write!(f, "pci {p}"),
        }
    }
}

/// A route: `to` is a network (host bits cleared); `via` None means on-link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub to: IpNet,
    pub via: Option<IpAddr>,
}

/// A permanent neighbour (ARP / NDP) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourSpec {
    pub ip: IpAddr,
    pub mac: MacAddr,
}

/// One validated `networks` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// Its position in `networks`, for messages.
    pub index: usize,
    pub selector: Selector,
    /// The name to give the NIC; None keeps the kernel's.
    pub name: Option<String>,
    pub mtu: Option<u32>,
    /// Static addresses with their prefix length (host bits kept).
    pub addresses: Vec<IpNet>,
    pub gateway: Option<IpAddr>,
    pub routes: Vec<RouteSpec>,
    pub neighbours: Vec<NeighbourSpec>,
    pub dhcp: bool,
}

impl fmt::Display for NicSpec {
    /// `networks[0] (mac 52:54:00:12:34:56)`: how messages name a NIC.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "networks[{}] ({})", self.index, self.selector)
    }
}

/// Whether `name` is acceptable to the kernel as an interface name.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

/// Validates `networks`, naming the field of the first error.
pub fn validate(raw: &[RawNetwork]) -> Result<Vec<NicSpec>, SpecError> {
    let mut out: Vec<NicSpec> = Vec::new();
    for (i, n) in raw.iter().enumerate() {
        let spec = validate_one(i, n)?;
        let err = |f: &str, m: String| SpecError {
            path: format!("networks[{i}].{f}"),
            message: m,
        };
        if let Some(other) = out.iter().find(|o| o.selector == spec.selector) {
            let field = match spec.selector {
                Selector::Mac(_) => "mac",
                Selector::Pci(_) => "pci",
            };
            return Err(err(
                field,
                format!("the same NIC as networks[{}]", other.index),
            ));
        }
        if let Some(name) = &spec.name
            && let Some(other) = out.iter().find(|o| o.name.as_ref() == Some(name))
        {
            return Err(err(
                "name",
                format!("{name:?} is also the name of networks[{}]", other.index),
            ));
        }
        out.push(spec);
    }
    Ok(out)
}

fn validate_one(i: usize, n: &RawNetwork) -> Result<NicSpec, SpecError> {
    let err = |f: &str, m: String| SpecError {
        path: format!("networks[{i}]{f}"),
        message: m,
    };
    let mac = |f: &str, s: &str| {
        s.parse::<MacAddr>().map_err(|()| {
            err(
                f,
                format!("not a MAC address like \"52:54:00:12:34:56\": {s:?}"),
            )
        })
    };
    let ip = |f: &str, s: &str| {
        s.parse::<IpAddr>()
            .map_err(|_| err(f, format!("not an IP address: {s:?}")))
    };
    let selector = match (&n.mac, &n.pci) {
        (Some(m), None) => Selector::Mac(mac(".mac", m)?),
        (None, Some(p)) => Selector::Pci(p.parse().map_err(|()| {
            err(
                ".pci",
                format!("not a PCI address like \"0000:00:03.0\": {p:?}"),
            )
        })?),
        (Some(_), Some(_)) => {
            return Err(err("", "give either `mac` or `pci`, not both".into()));
        }
        (None, None) => {
            return Err(err(
                "",
                "the NIC must be found by `mac` or by `pci`: give one".into(),
            ));
        }
    };
    if let Some(name) = &n.name
        && !valid_ifname(name)
    {
        return Err(err(
            ".name",
            format!("not an interface name (1 to 15 bytes, no '/', ':' or spaces): {name:?}"),
        ));
    }
    let mut addresses: Vec<IpNet> = Vec::new();
    for (j, a) in n.addresses.iter().enumerate() {
        let f = format!(".addresses[{j}]");
        let net = a.parse::<IpNet>().map_err(|_| {
            err(
                &f,
                format!("not an address with a prefix length like \"10.0.2.15/24\": {a:?}"),
            )
        })?;
        if net.addr().is_unspecified() || net.addr().is_multicast() {
            return Err(err(&f, format!("not a host address: {a:?}")));
        }
        if addresses.iter().any(|x| x.addr() == net.addr()) {
            return Err(err(&f, format!("{} is listed twice", net.addr())));
        }
        addresses.push(net);
    }
    if let Some(mtu) = n.mtu {
        let min = if addresses.iter().any(|a| matches!(a, IpNet::V6(_))) {
            1280
        } else {
            68
        };
        if !(min..=65535).contains(&mtu) {
            return Err(err(
                ".mtu",
                format!("{mtu} is out of range ({min} to 65535)"),
            ));
        }
    }
    let gateway = match &n.gateway {
        None => None,
        Some(g) => {
            let g = ip(".gateway", g)?;
            if g.is_unspecified() || g.is_multicast() {
                return Err(err(".gateway", format!("not a router address: {g}")));
            }
            Some(g)
        }
    };
    let mut routes = Vec::new();
    for (j, r) in n.routes.iter().enumerate() {
        let to = r.to.parse::<IpNet>().map_err(|_| {
            err(
                &format!(".routes[{j}].to"),
                format!("not a network like \"10.9.0.0/16\": {:?}", r.to),
            )
        })?;
        let via = match &r.via {
            None => None,
            Some(v) => {
                let v = ip(&format!(".routes[{j}].via"), v)?;
                if v.is_ipv4() != to.addr().is_ipv4() {
                    return Err(err(
                        &format!(".routes[{j}].via"),
                        format!("{v} is not of the same family as {to}"),
                    ));
                }
                Some(v)
            }
        };
        routes.push(RouteSpec {
            to: to.trunc(),
            via,
        });
    }
    let mut neighbours = Vec::new();
    for (j, nb) in n.neighbours.iter().enumerate() {
        neighbours.push(NeighbourSpec {
            ip: ip(&format!(".neighbours[{j}].ip"), &nb.ip)?,
            mac: mac(&format!(".neighbours[{j}].mac"), &nb.mac)?,
        });
    }
    Ok(NicSpec {
        index: i,
        selector,
        name: n.name.clone(),
        mtu: n.mtu,
        addresses,
        gateway,
        routes,
        neighbours,
        dhcp: n.dhcp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> Result<Vec<NicSpec>, SpecError> {
        let raw: Vec<RawNetwork> = serde_json::from_value(v).expect("shape");
        validate(&raw)
    }

    #[test]
    fn the_contract_example_validates() {
        let specs = parse(serde_json::json!([{
            "name": "eth0", "mac": "52:54:00:12:34:56", "mtu": 1500,
            "addresses": ["10.0.2.15/24", "fd00::15/64"], "gateway": "10.0.2.2",
            "routes": [{"to": "10.9.0.7/16", "via": "10.0.2.1"}],
            "neighbours": [{"ip": "10.0.2.9", "mac": "52:54:00:00:00:09"}],
            "dhcp": false
        }]))
        .unwrap();
        let s = &specs[0];
        assert_eq!(
            s.selector,
            Selector::Mac(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]))
        );
        assert_eq!(s.addresses[0].to_string(), "10.0.2.15/24");
        assert_eq!(
            s.routes[0].to.to_string(),
            "10.9.0.0/16",
            "host bits cleared"
        );
        assert_eq!(s.to_string(), "networks[0] (mac 52:54:00:12:34:56)");
    }

    #[test]
    fn a_pci_slot_is_normalised_to_the_sysfs_form() {
        let specs = parse(serde_json::json!([{"pci": "00:1F.7"}])).unwrap();
        assert_eq!(
            specs[0].selector,
            Selector::Pci(PciAddr("0000:00:1f.7".into()))
        );
    }

    #[test]
    fn errors_name_the_field_and_the_value() {
        let cases = [
            (
                serde_json::json!([{"mac": "zz"}]),
                "networks[0].mac: not a MAC address like \"52:54:00:12:34:56\": \"zz\"",
            ),
            (
                serde_json::json!([{"pci": "0000:00:20.0"}]),
                "networks[0].pci: not a PCI address like \"0000:00:03.0\": \"0000:00:20.0\"",
            ),
            (
                serde_json::json!([{}]),
                "networks[0]: the NIC must be found by `mac` or by `pci`: give one",
            ),
            (
                serde_json::json!([{"mac": "52:54:00:00:00:01", "pci": "00:03.0"}]),
                "networks[0]: give either `mac` or `pci`, not both",
            ),
            (
                serde_json::json!([{"mac": "52:54:00:00:00:01", "name": "a/b"}]),
                "networks[0].name: not an interface name (1 to 15 bytes, no '/', ':' or spaces): \"a/b\"",
            ),
            (
                serde_json::json!([{"mac": "52:54:00:00:00:01", "addresses": ["10.0.0.1"]}]),
                "networks[0].addresses[0]: not an address with a prefix length like \"10.0.2.15/24\": \"10.0.0.1\"",
            ),
            (
                serde_json::json!([{"mac": "52:54:00:00:00:01", "mtu": 1000, "addresses": ["fd00::1/64"]}]),
                "networks[0].mtu: 1000 is out of range (1280 to 65535)",
            ),
            (
                serde_json::json!([{"mac": "52:54:00:00:00:01", "gateway": "nope"}]),
                "networks[0].gateway: not an IP address: \"nope\"",
            ),
            (
                serde_json::json!([{"mac": "52:54:00:00:00:01", "routes": [{"to": "10.0.0.0/8", "via": "fd00::1"}]}]),
                "networks[0].routes[0].via: fd00::1 is not of the same family as 10.0.0.0/8",
            ),
            (
                serde_json::json!([{"mac": "52:54:00:00:00:01", "neighbours": [{"ip": "10.0.0.9", "mac": "1:2:3:4:5:6"}]}]),
                "networks[0].neighbours[0].mac: not a MAC address like \"52:54:00:12:34:56\": \"1:2:3:4:5:6\"",
            ),
            (
                serde_json::json!([{"mac": "52:54:00:00:00:01"}, {"mac": "52:54:00:00:00:01"}]),
                "networks[1].mac: the same NIC as networks[0]",
            ),
            (
                serde_json::json!([{"mac": "52:54:00:00:00:01", "name": "x"}, {"pci": "00:03.0", "name": "x"}]),
                "networks[1].name: \"x\" is also the name of networks[0]",
            ),
        ];
        for (v, want) in cases {
            assert_eq!(parse(v).unwrap_err().to_string(), want);
        }
    }
}
