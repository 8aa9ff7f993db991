//! The system's identity and limits: host and domain name, `/etc/hosts`,
//! `/etc/resolv.conf`, sysctls, and the resource limits every process
//! inherits from PID 1. The /etc files are written to `/run/tether/etc` and
//! bind-mounted over the image's (as Docker does), so a shared or read-only
//! root is never written to.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
use serde::Deserialize;

use super::mount;
use crate::config::{ConfigError, Dns, HostEntry, config_error as err};

/// Where the /etc files tether writes live.
const ETC_DIR: &str = "/run/tether/etc";
/// Open files allowed when the config says nothing (the kernel's default of
/// 1024 is too few for many servers; this is the kernel's `nr_open` default).
pub const DEFAULT_NOFILE: u64 = 1 << 20;

/// A limit as written: a number or `"unlimited"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawLimit {
    Number(u64),
    Word(String),
}

/// A sysctl value as written: text or a number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SysctlValue {
    Text(String),
    Number(i64),
}

/// A validated resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ulimit {
    pub resource: Resource,
    pub soft: u64,
    pub hard: u64,
}

/// A validated sysctl: its file under /proc/sys and the value to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    pub key: String,
    pub file: PathBuf,
    pub value: String,
}

/// Validates `hostname` (or `domainname`: `field` names which).
pub fn validate_name(field: &str, name: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(name) = name else { return Ok(None) };
    let host_chars = |s: &str| {
        s.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
    };
    let ok = match field {
        "hostname" => host_chars(&name),
        _ => name.bytes().all(|b| b.is_ascii_graphic()),
    };
    if name.is_empty() || name.len() > 64 || !ok {
        return Err(err(
            field,
            format!("{name:?} is not a name of 1 to 64 letters, digits, '-' and '.'"),
        ));
    }
    Ok(Some(name))
}

fn is_word(s: &str) -> bool {
    !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c.is_control() || c == '#')
}

/// Validates `hosts`.
pub fn validate_hosts(hosts: Vec<HostEntry>) -> Result<Vec<HostEntry>, ConfigError> {
    for (i, h) in hosts.iter().enumerate() {
        if h.ip.parse::<IpAddr>().is_err() {
            return Err(err(
                format!("hosts[{i}].ip"),
                format!("{:?} is not an IP address", h.ip),
            ));
        }
        if h.names.is_empty() {
            return Err(err(format!("hosts[{i}].names"), "at least one name"));
        }
        if let Some(j) = h.names.iter().position(|n| !is_word(n)) {
            return Err(err(format!("hosts[{i}].names[{j}]"), "not a host name"));
        }
    }
    Ok(hosts)
}

/// Validates `dns`.
pub fn validate_dns(dns: Option<Dns>) -> Result<Option<Dns>, ConfigError> {
    let Some(d) = dns else { return Ok(None) };
    for (i, n) in d.nameservers.iter().enumerate() {
        if n.parse::<IpAddr>().is_err() {
            return Err(err(
                format!("dns.nameservers[{i}]"),
                format!("{n:?} is not an IP address"),
            ));
        }
    }
    for (list, name) in [(&d.search, "search"), (&d.options, "options")] {
        if let Some(i) = list.iter().position(|s| !is_word(s)) {
            return Err(err(format!("dns.{name}[{i}]"), "one word, without spaces"));
        }
    }
    Ok(Some(d))
}

/// Validates `ulimits`.
pub fn validate_ulimits(raw: BTreeMap<String, [RawLimit; 2]>) -> Result<Vec<Ulimit>, ConfigError> {
    let mut out = Vec::new();
    for (name, [soft, hard]) in raw {
        let at = format!("ulimits.{name}");
        let resource = match name.as_str() {
            "nofile" => Resource::RLIMIT_NOFILE,
            "nproc" => Resource::RLIMIT_NPROC,
            "core" => Resource::RLIMIT_CORE,
            "memlock" => Resource::RLIMIT_MEMLOCK,
            "stack" => Resource::RLIMIT_STACK,
            _ => {
                return Err(err(
                    at,
                    "unknown limit (nofile, nproc, core, memlock, stack)",
                ));
            }
        };
        let value = |l: RawLimit| match l {
            RawLimit::Number(n) => Ok(n),
            RawLimit::Word(w) if w == "unlimited" => Ok(RLIM_INFINITY),
            RawLimit::Word(w) => Err(err(
                &at,
                format!("{w:?} is neither a number nor \"unlimited\""),
            )),
        };
        let (soft, hard) = (value(soft)?, value(hard)?);
        if soft > hard {
            return Err(err(
                at,
                "the soft limit (first) is above the hard limit (second)",
            ));
        }
        out.push(Ulimit {
            resource,
            soft,
            hard,
        });
    }
    Ok(out)
}

/// Validates `sysctls`: `net.ipv4.ip_forward` or `net/ipv4/conf/eth0.1/rp_filter`
/// (slashes when a component has a dot in it).
pub fn validate_sysctls(raw: BTreeMap<String, SysctlValue>) -> Result<Vec<Sysctl>, ConfigError> {
    let mut out = Vec::new();
    for (key, value) in raw {
        let at = format!("sysctls.{key}");
        let parts: Vec<&str> = if key.contains('/') {
            key.split('/').collect()
        } else {
            key.split('.').collect()
        };
        if parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0'))
        {
            return Err(err(at, "not a sysctl name like \"net.ipv4.ip_forward\""));
        }
        let value = match value {
            SysctlValue::Text(t) => t,
            SysctlValue::Number(n) => n.to_string(),
        };
        if value.contains(|c: char| c.is_control() && c != '\t') {
            return Err(err(at, "the value must be one line"));
        }
        let file = Path::new("/proc/sys").join(parts.join("/"));
        out.push(Sysctl { key, file, value });
    }
    Ok(out)
}

/// Renders `/etc/hosts`: localhost for both address families, the host name
/// (on 127.0.1.1, as Debian does, unless an entry names it), then `hosts`.
pub fn render_hosts(hostname: Option<&str>, hosts: &[HostEntry]) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(name) = hostname
        && !hosts.iter().any(|h| h.names.iter().any(|n| n == name))
    {
        let short = name.split('.').next().unwrap_or(name);
        if short == name {
            out.push_str(&format!("127.0.1.1\t{name}\n"));
        } else {
            out.push_str(&format!("127.0.1.1\t{name} {short}\n"));
        }
    }
    for h in hosts {
        out.push_str(&format!("{}\t{}\n", h.ip, h.names.join(" ")));
    }
    out
}

/// Renders `/etc/resolv.conf`.
pub fn render_resolv_conf(dns: &Dns) -> String {
    let mut out = String::new();
    for n in &dns.nameservers {
        out.push_str(&format!("nameserver {n}\n"));
    }
    if !dns.search.is_empty() {
        out.push_str(&format!("search {}\n", dns.search.join(" ")));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    out
}

/// Sets the host name.
pub fn set_hostname(name: &str) -> io::Result<()> {
    nix::unistd::sethostname(name).map_err(io::Error::from)
}

/// Sets the (NIS) domain name.
pub fn set_domainname(name: &str) -> io::Result<()> {
    std::fs::write("/proc/sys/kernel/domainname", name)
}

/// Writes a sysctl.
pub fn write_sysctl(s: &Sysctl) -> io::Result<()> {
    std::fs::write(&s.file, &s.value)
}

/// Sets a resource limit of PID 1, which every process started later inherits.
pub fn set_limit(l: &Ulimit) -> io::Result<()> {
    setrlimit(l.resource, l.soft, l.hard).map_err(io::Error::from)
}

/// The open-file limit PID 1 starts with, unless `ulimits` sets one.
pub fn raise_default_nofile() -> io::Result<()> {
    setrlimit(Resource::RLIMIT_NOFILE, DEFAULT_NOFILE, DEFAULT_NOFILE).map_err(io::Error::from)
}

/// Puts `contents` at `/etc/NAME` (under `root`) by writing it to
/// `/run/tether/etc/NAME` and bind-mounting that over the image's file (an
/// empty one is made first if the image has none).
pub fn provide_etc_file(root: &Path, name: &str, contents: &str) -> io::Result<()> {
    let dir = mount::under(root, ETC_DIR);
    std::fs::create_dir_all(&dir)?;
    let source = dir.join(name);
    std::fs::write(&source, contents)?;
    set_readable(&source)?;
    let target = mount::under(root, &format!("/etc/{name}"));
    if std::fs::metadata(&target).is_err() {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, "")?;
    }
    mount::bind_mount(&source, &target)
}

fn set_readable(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

#[cfg(test)]
#[path = "system_tests.rs"]
mod tests;
