//! Network interfaces (links): listing them, finding the one a spec means (by
//! MAC, or by PCI function through sysfs), and setting name, MTU and up.

use std::path::{Path, PathBuf};

use neli::consts::nl::NlmF;
use neli::consts::rtnl::{Arphrd, Iff, Ifla, RtAddrFamily, Rtm};
use neli::rtnl::{Ifinfomsg, IfinfomsgBuilder};
use neli::types::RtBuffer;

use super::rtnl::{Rtnl, RtnlError, attr};
use super::spec::{MacAddr, PciAddr, Selector};

/// What the kernel says about one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// The interface index (stable while the interface exists, across renames).
    pub index: u32,
    pub name: String,
    /// None for interfaces without an Ethernet address.
    pub mac: Option<MacAddr>,
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    pub loopback: bool,
}

/// Lists every interface in the namespace.
pub fn list(rtnl: &mut Rtnl) -> Result<Vec<LinkInfo>, RtnlError> {
    let req = IfinfomsgBuilder::default()
        .ifi_family(RtAddrFamily::Unspecified)
        .build()
        .map_err(|e| RtnlError::Socket(e.to_string()))?;
    let msgs: Vec<Ifinfomsg> = rtnl.dump(Rtm::Getlink, req)?;
    Ok(msgs.iter().filter_map(decode).collect())
}

fn decode(m: &Ifinfomsg) -> Option<LinkInfo> {
    let attrs = m.rtattrs().get_attr_handle();
    let name = attrs
        .get_attr_payload_as_with_len::<String>(Ifla::Ifname)
        .ok()?;
    let mac = attrs.get_attribute(Ifla::Address).and_then(|a| {
        let b: &[u8] = a.rta_payload().as_ref();
        <[u8; 6]>::try_from(b).ok().map(MacAddr)
    });
    Some(LinkInfo {
        index: u32::try_from(*m.ifi_index()).ok()?,
        name,
        mac,
        mtu: attrs.get_attr_payload_as::<u32>(Ifla::Mtu).unwrap_or(0),
        up: m.ifi_flags().contains(Iff::UP),
        loopback: *m.ifi_type() == Arphrd::Loopback,
    })
}

/// The PCI function a network interface sits on: the nearest PCI device among
/// the ancestors of `/sys/class/net/NAME/device` (a virtio NIC's `device` is
/// `.../0000:00:03.0/virtio0`, so the nearest is its parent).
pub fn pci_of(sys_class_net: &Path, ifname: &str) -> Option<PciAddr> {
    let dev = std::fs::canonicalize(sys_class_net.join(ifname).join("device")).ok()?;
    dev.ancestors()
        .filter_map(|p| p.file_name()?.to_str()?.parse::<PciAddr>().ok())
        .next()
}

/// Where the kernel's network interfaces appear in sysfs.
pub fn sys_class_net() -> PathBuf {
    PathBuf::from("/sys/class/net")
}

/// The interface `selector` means, among `links`.
pub fn find<'a>(
    links: &'a [LinkInfo],
    selector: &Selector,
    sys_class_net: &Path,
) -> Option<&'a LinkInfo> {
    match selector {
        Selector::Mac(mac) => links.iter().find(|l| l.mac.as_ref() == Some(mac)),
        Selector::Pci(pci) => links
            .iter()
            .find(|l| pci_of(sys_class_net, &l.name).as_ref() == Some(pci)),
    }
}

/// Sets flags and attributes of interface `index` in one RTM_SETLINK.
fn set(
    rtnl: &mut Rtnl,
    index: u32,
    up: Option<bool>,
    name: Option<&str>,
    mtu: Option<u32>,
) -> Result<(), RtnlError> {
    let mut attrs = RtBuffer::new();
    if let Some(name) = name {
        attrs.push(attr(Ifla::Ifname, name)?);
    }
    if let Some(mtu) = mtu {
        attrs.push(attr(Ifla::Mtu, mtu)?);
    }
    let mut b = IfinfomsgBuilder::default()
        .ifi_family(RtAddrFamily::Unspecified)
        .ifi_index(i32::try_from(index).map_err(|e| RtnlError::Socket(e.to_string()))?)
        .rtattrs(attrs);
    b = match up {
        Some(true) => b.up(),
        Some(false) => b.down(),
        None => b,
    };
    let msg = b.build().map_err(|e| RtnlError::Socket(e.to_string()))?;
    rtnl.request(Rtm::Setlink, NlmF::empty(), msg)
}

/// Sets interface `index`'s MAC address (some drivers refuse while it is up:
/// EBUSY).
pub fn set_mac(rtnl: &mut Rtnl, index: u32, mac: MacAddr) -> Result<(), RtnlError> {
    let mut attrs = RtBuffer::new();
    attrs.push(attr(Ifla::Address, mac.0.to_vec())?);
    let msg = IfinfomsgBuilder::default()
        .ifi_family(RtAddrFamily::Unspecified)
        .ifi_index(i32::try_from(index).map_err(|e| RtnlError::Socket(e.to_string()))?)
        .rtattrs(attrs)
        .build()
        .map_err(|e| RtnlError::Socket(e.to_string()))?;
    rtnl.request(Rtm::Setlink, NlmF::empty(), msg)
}

/// Brings interface `index` up or down.
pub fn set_up(rtnl: &mut Rtnl, index: u32, up: bool) -> Result<(), RtnlError> {
    set(rtnl, index, Some(up), None, None)
}

/// Which step of bringing a link into shape failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkStep {
    Down,
    MoveAside,
    Rename,
    Mtu,
    Up,
}

impl std::fmt::Display for LinkStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkStep::Down => "bringing it down to rename it",
            LinkStep::MoveAside => "renaming the interface that had the wanted name",
            LinkStep::Rename => "renaming it",
            LinkStep::Mtu => "setting the MTU",
            LinkStep::Up => "bringing it up",
        })
    }
}

/// Renames `link` to `name` (down first, as the kernel requires; another link
/// that holds the name is moved aside to a temporary name), sets `mtu`, and
/// brings it up. Returns the link's final name.
pub fn configure(
    rtnl: &mut Rtnl,
    links: &[LinkInfo],
    link: &LinkInfo,
    name: Option<&str>,
    mtu: Option<u32>,
) -> Result<String, (LinkStep, RtnlError)> {
    let rename = name.filter(|n| *n != link.name);
    if let Some(name) = rename {
        if link.up {
            set(rtnl, link.index, Some(false), None, None).map_err(|e| (LinkStep::Down, e))?;
        }
        if let Some(holder) = links
            .iter()
            .find(|l| l.name == name && l.index != link.index)
        {
            let aside = format!("tether{}", holder.index);
            if holder.up {
                set(rtnl, holder.index, Some(false), None, None)
                    .map_err(|e| (LinkStep::MoveAside, e))?;
            }
            set(rtnl, holder.index, None, Some(&aside), None)
                .map_err(|e| (LinkStep::MoveAside, e))?;
            tracing::info!(
                "interface {name} moved aside to {aside}: another NIC is to be called {name}"
            );
            if holder.up {
                set(rtnl, holder.index, Some(true), None, None)
                    .map_err(|e| (LinkStep::MoveAside, e))?;
            }
        }
        set(rtnl, link.index, None, Some(name), None).map_err(|e| (LinkStep::Rename, e))?;
    }
    if let Some(mtu) = mtu.filter(|m| *m != link.mtu) {
        set(rtnl, link.index, None, None, Some(mtu)).map_err(|e| (LinkStep::Mtu, e))?;
    }
    set(rtnl, link.index, Some(true), None, None).map_err(|e| (LinkStep::Up, e))?;
    Ok(rename.unwrap_or(&link.name).to_owned())
}

/// Brings the loopback interface up (idempotent).
pub fn loopback_up(rtnl: &mut Rtnl) -> Result<(), RtnlError> {
    for l in list(rtnl)?.iter().filter(|l| l.loopback && !l.up) {
        set(rtnl, l.index, Some(true), None, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_virtio_nic_is_found_through_its_pci_parent() {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("devices/pci0000:00/0000:00:03.0/virtio0");
        std::fs::create_dir_all(&dev).unwrap();
        let net = root.path().join("class/net/eth0");
        std::fs::create_dir_all(&net).unwrap();
        std::os::unix::fs::symlink(&dev, net.join("device")).unwrap();
        let class = root.path().join("class/net");
        assert_eq!(
            pci_of(&class, "eth0").map(|p| p.to_string()),
            Some("0000:00:03.0".into())
        );
        assert_eq!(pci_of(&class, "eth1"), None, "no such interface");
        let links = [LinkInfo {
            index: 2,
            name: "eth0".into(),
            mac: None,
            mtu: 1500,
            up: false,
            loopback: false,
        }];
        let pci = Selector::Pci("0000:00:03.0".parse().unwrap());
        assert_eq!(find(&links, &pci, &class).map(|l| l.index), Some(2));
        let other = Selector::Pci("0000:00:04.0".parse().unwrap());
        assert_eq!(find(&links, &other, &class), None);
    }
}
