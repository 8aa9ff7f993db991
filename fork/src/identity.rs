//! The VM identity (docs/PROTOCOL.md 4.5): one JSON object padded with spaces
//! to exactly [`IDENTITY_SIZE`] bytes, read from outside the saved state
//! (QEMU fw_cfg, VMware guestinfo), so a child reads its own and not its
//! parent's. The parser is strict: a wrong size, an unknown field or a bad
//! value is an error that names the field.

use std::net::IpAddr;

use serde::Deserialize;

/// The identity's exact size in bytes (a fw_cfg file's size is read once,
/// when the guest's driver probes it, so it never changes).
pub const IDENTITY_SIZE: usize = 1024;

/// Longest container id or host name taken.
const MAX_NAME: usize = 253;

/// Why an identity was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity is {0} bytes; it must be exactly {IDENTITY_SIZE} (JSON padded with spaces)")]
    Size(usize),
    #[error("identity is not a JSON object: {0}")]
    Json(String),
    #[error("identity field `{field}`: {why}")]
    Field { field: String, why: String },
}

fn field(field: impl Into<String>, why: impl Into<String>) -> IdentityError {
    IdentityError::Field {
        field: field.into(),
        why: why.into(),
    }
}

/// How a network interface gets its address after a fork.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressing {
    /// DHCP (the identity gave no `address`).
    Dhcp,
    /// A static address with its prefix length, and an optional gateway.
    Static {
        address: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
    },
}

/// One network interface's identity, in configuration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The MAC address to take.
    pub mac: [u8; 6],
    pub addressing: Addressing,
}

/// Whether the VM was booted or forked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Booted: no `parent`, no `child`.
    Booted,
    /// A child: forked from container `parent`, child number `n` (≥ 1).
    Child { parent: String, n: u32 },
}

/// A VM's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Different for every VM the appliance starts; a changed generation is
    /// how a guest knows it is a child.
    pub generation: u64,
    pub role: Role,
    /// The container id (a child's primary session takes it).
    pub id: Option<String>,
    pub hostname: Option<String>,
    /// 32 bytes mixed into the kernel's random pool.
    pub nonce: Option<[u8; 32]>,
    pub nics: Vec<Nic>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    generation: u64,
    parent: Option<String>,
    id: Option<String>,
    child: Option<u32>,
    hostname: Option<String>,
    nonce: Option<String>,
    #[serde(default)]
    nics: Vec<RawNic>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNic {
    mac: String,
    address: Option<String>,
    gateway: Option<String>,
}

impl Identity {
    /// Parses the padded JSON. A child (with `parent`) must also carry
    /// `child`, `id`, `hostname` and `nonce`; a booted VM may carry only
    /// `generation`.
    pub fn parse(bytes: &[u8]) -> Result<Self, IdentityError> {
        if bytes.len() != IDENTITY_SIZE {
            return Err(IdentityError::Size(bytes.len()));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|e| IdentityError::Json(format!("not UTF-8: {e}")))?;
        let json = text.trim_end_matches(' ');
        let mut de = serde_json::Deserializer::from_str(json);
        let raw =
            RawIdentity::deserialize(&mut de).map_err(|e| IdentityError::Json(e.to_string()))?;
        de.end()
            .map_err(|e| IdentityError::Json(format!("after the object: {e}")))?;
        raw.validate()
    }

    /// Whether this identity, read now, says the VM is a child of the one
    /// whose generation was `known` (the last generation this guest ran as):
    /// the generation changed. Without a known generation nothing can be told.
    pub fn is_new_generation(&self, known: Option<u64>) -> bool {
        known.is_some_and(|g| g != self.generation)
    }

    /// Encodes the identity as the hypervisor hands it over: compact JSON
    /// padded with spaces to [`IDENTITY_SIZE`] (for tests and tools). None if
    /// it does not fit.
    pub fn to_padded(&self) -> Option<Vec<u8>> {
        let mut o = serde_json::Map::new();
        o.insert("generation".into(), self.generation.into());
        if let Role::Child { parent, n } = &self.role {
            o.insert("parent".into(), parent.clone().into());
            o.insert("child".into(), (*n).into());
        }
        if let Some(id) = &self.id {
            o.insert("id".into(), id.clone().into());
        }
        if let Some(h) = &self.hostname {
            o.insert("hostname".into(), h.clone().into());
        }
        if let Some(n) = &self.nonce {
            let hex: String = n.iter().map(|b| format!("{b:02x}")).collect();
            o.insert("nonce".into(), hex.into());
        }
        let nics: Vec<serde_json::Value> = self.nics.iter().map(Nic::to_json).collect();
        o.insert("nics".into(), nics.into());
        let mut out = serde_json::Value::Object(o).to_string().into_bytes();
        if out.len() > IDENTITY_SIZE {
            return None;
        }
        out.resize(IDENTITY_SIZE, b' ');
        Some(out)
    }
}

impl Nic {
    fn to_json(&self) -> serde_json::Value {
        let m = self.mac;
        let mac = format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
        let mut o = serde_json::Map::new();
        o.insert("mac".into(), mac.into());
        if let Addressing::Static {
            address,
            prefix,
            gateway,
        } = &self.addressing
        {
            o.insert("address".into(), format!("{address}/{prefix}").into());
            if let Some(g) = gateway {
                o.insert("gateway".into(), g.to_string().into());
            }
        }
        o.into()
    }
}

impl RawIdentity {
    fn validate(self) -> Result<Identity, IdentityError> {
        let role = match (self.parent, self.child) {
            (None, None) => Role::Booted,
            (Some(parent), Some(n)) => {
                name("parent", &parent)?;
                if n == 0 {
                    return Err(field("child", "must be 1 or more"));
                }
                Role::Child { parent, n }
            }
            (Some(_), None) => {
                return Err(field("child", "missing (a child has `parent` and `child`)"));
            }
            (None, Some(_)) => {
                return Err(field(
                    "parent",
                    "missing (a child has `parent` and `child`)",
                ));
            }
        };
        if let Some(id) = &self.id {
            name("id", id)?;
        }
        if let Some(h) = &self.hostname {
            hostname(h)?;
        }
        let nonce = self.nonce.as_deref().map(parse_nonce).transpose()?;
        if matches!(role, Role::Child { .. }) {
            for (f, present) in [
                ("id", self.id.is_some()),
                ("hostname", self.hostname.is_some()),
                ("nonce", nonce.is_some()),
            ] {
                if !present {
                    return Err(field(f, "missing (a child's identity needs it)"));
                }
            }
        }
        let nics = self
            .nics
            .into_iter()
            .enumerate()
            .map(|(i, n)| n.validate(i))
            .collect::<Result<_, _>>()?;
        Ok(Identity {
            generation: self.generation,
            role,
            id: self.id,
            hostname: self.hostname,
            nonce,
            nics,
        })
    }
}

impl RawNic {
    fn validate(self, i: usize) -> Result<Nic, IdentityError> {
        let at = |f: &str| format!("nics[{i}].{f}");
        let mac = parse_mac(&self.mac).ok_or_else(|| {
            field(
                at("mac"),
                format!("{:?} is not a MAC address like 52:54:00:12:34:56", self.mac),
            )
        })?;
        if mac[0] & 1 == 1 {
            return Err(field(at("mac"), "is a multicast address"));
        }
        let addressing = match (self.address, self.gateway) {
            (None, None) => Addressing::Dhcp,
            (None, Some(_)) => {
                return Err(field(
                    at("gateway"),
                    "given without an `address` (DHCP sets its own)",
                ));
            }
            (Some(a), gateway) => {
                let (address, prefix) = parse_cidr(&a).ok_or_else(|| {
                    field(
                        at("address"),
                        format!("{a:?} is not an address with a prefix, like 10.0.2.16/24"),
                    )
                })?;
                let gateway = gateway
                    .map(|g| {
                        let ip: IpAddr = g.parse().map_err(|_| {
                            field(at("gateway"), format!("{g:?} is not an IP address"))
                        })?;
                        if ip.is_ipv4() != address.is_ipv4() {
                            return Err(field(at("gateway"), "is not of the address's family"));
                        }
                        Ok(ip)
                    })
                    .transpose()?;
                Addressing::Static {
                    address,
                    prefix,
                    gateway,
                }
            }
        };
        Ok(Nic { mac, addressing })
    }
}

fn name(f: &str, s: &str) -> Result<(), IdentityError> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(field(f, format!("must be 1 to {MAX_NAME} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(field(f, "has control characters"));
    }
    Ok(())
}

/// A host name: dot-separated labels of letters, digits and hyphens (RFC 1123).
fn hostname(h: &str) -> Result<(), IdentityError> {
    name("hostname", h)?;
    let ok = h.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    if !ok {
        return Err(field(
            "hostname",
            format!("{h:?} is not a host name (letters, digits, '-', '.')"),
        ));
    }
    Ok(())
}

fn parse_nonce(s: &str) -> Result<[u8; 32], IdentityError> {
    let bad = || field("nonce", "must be 64 hex digits (32 bytes)");
    if s.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = s.split_once('/')?;
    let address: IpAddr = a.parse().ok()?;
    let prefix: u8 = p.parse().ok()?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((address, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded(json: &str) -> Vec<u8> {
        let mut b = json.as_bytes().to_vec();
        b.resize(IDENTITY_SIZE, b' ');
        b
    }

    const NONCE: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn child_json(extra: &str) -> String {
        format!(
            r#"{{"generation": 7, "parent": "web", "id": "web-1", "child": 1, "hostname": "web-1",
 "nonce": "{NONCE}"{extra}}}"#
        )
    }

    fn err(json: &str) -> String {
        Identity::parse(&padded(json)).unwrap_err().to_string()
    }

    #[test]
    fn the_protocol_md_example_parses() {
        let json = child_json(
            r#", "nics": [{"mac": "52:54:00:12:34:57", "address": "10.0.2.16/24", "gateway": "10.0.2.2"}, {"mac": "52:54:00:12:34:58"}]"#,
        );
        let id = Identity::parse(&padded(&json)).unwrap();
        assert_eq!(id.generation, 7);
        assert_eq!(
            id.role,
            Role::Child {
                parent: "web".into(),
                n: 1
            }
        );
        assert_eq!(id.id.as_deref(), Some("web-1"));
        assert_eq!(id.nonce.unwrap()[31], 0x1f);
        assert_eq!(id.nics[0].mac, [0x52, 0x54, 0, 0x12, 0x34, 0x57]);
        assert_eq!(
            id.nics[0].addressing,
            Addressing::Static {
                address: "10.0.2.16".parse().unwrap(),
                prefix: 24,
                gateway: Some("10.0.2.2".parse().unwrap())
            }
        );
        assert_eq!(id.nics[1].addressing, Addressing::Dhcp);
        // And it survives its own encoding.
        assert_eq!(Identity::parse(&id.to_padded().unwrap()).unwrap(), id);
    }

    #[test]
    fn a_booted_vm_needs_only_its_generation() {
        let id = Identity::parse(&padded(r#"{"generation": 18446744073709551615}"#)).unwrap();
        assert_eq!((id.generation, id.role), (u64::MAX, Role::Booted));
        assert!(id.nics.is_empty());
    }

    #[test]
    fn the_size_must_be_exact() {
        let e = Identity::parse(br#"{"generation": 1}"#).unwrap_err();
        assert_eq!(e, IdentityError::Size(17));
        assert!(e.to_string().contains("exactly 1024"));
        let mut long = padded(r#"{"generation": 1}"#);
        long.push(b' ');
        assert_eq!(Identity::parse(&long), Err(IdentityError::Size(1025)));
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (r#"{"parent": "web"}"#.to_string(), "generation"),
            (r#"{"generation": -1}"#.into(), "invalid value"),
            (r#"{"generation": 1, "colour": "red"}"#.into(), "colour"),
            (r#"{"generation": 1, "parent": "web"}"#.into(), "`child`"),
            (r#"{"generation": 1, "child": 2}"#.into(), "`parent`"),
            (
                r#"{"generation": 1, "parent": "web", "child": 0}"#.into(),
                "`child`",
            ),
            (child_json("").replace(r#""id": "web-1", "#, ""), "`id`"),
            (child_json("").replace(NONCE, "abc"), "`nonce`"),
            (child_json("").replace(NONCE, &"zz".repeat(32)), "`nonce`"),
            (
                child_json("").replace(r#""hostname": "web-1""#, r#""hostname": "web_1""#),
                "`hostname`",
            ),
            (
                child_json("").replace(r#""id": "web-1""#, r#""id": "a\nb""#),
                "`id`",
            ),
            (
                child_json(r#", "nics": [{"mac": "52:54:00:12:34"}]"#),
                "`nics[0].mac`",
            ),
            (
                child_json(r#", "nics": [{"mac": "01:00:5e:00:00:01"}]"#),
                "multicast",
            ),
            (
                child_json(
                    r#", "nics": [{"mac": "52:54:00:12:34:56"}, {"mac": "52:54:00:12:34:57", "address": "10.0.2.16"}]"#,
                ),
                "`nics[1].address`",
            ),
            (
                child_json(
                    r#", "nics": [{"mac": "52:54:00:12:34:56", "address": "10.0.2.16/33"}]"#,
                ),
                "`nics[0].address`",
            ),
            (
                child_json(r#", "nics": [{"mac": "52:54:00:12:34:56", "gateway": "10.0.2.2"}]"#),
                "`nics[0].gateway`",
            ),
            (
                child_json(
                    r#", "nics": [{"mac": "52:54:00:12:34:56", "address": "10.0.2.16/24", "gateway": "fe80::1"}]"#,
                ),
                "family",
            ),
            (
                child_json(r#", "nics": [{"mac": "52:54:00:12:34:56", "mtu": 9000}]"#),
                "mtu",
            ),
            (r#"{"generation": 1} x"#.into(), "after the object"),
            ("[1]".into(), "not a JSON object"),
        ];
        for (json, named) in cases {
            let e = err(&json);
            assert!(e.contains(named), "{json}: {e}");
        }
    }

    #[test]
    fn a_changed_generation_means_a_child() {
        let id = Identity::parse(&padded(r#"{"generation": 8}"#)).unwrap();
        assert!(id.is_new_generation(Some(7)));
        assert!(!id.is_new_generation(Some(8)));
        assert!(!id.is_new_generation(None));
    }
}
