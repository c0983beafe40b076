//! Advertising a node on the LAN over mDNS (DNS-SD), so that a coordinator finds it
//! without being told its address.
//!
//! One service instance per node: type `_strata._tcp.local.`, instance name = node name,
//! port = the node's gRPC port, and TXT records `id`, `proto`, `mem`, `adapter`,
//! `backend` and, for a node of a cluster, `cluster` (the public fingerprint of its
//! cluster key, never the key) (the coordinator's discovery reads exactly these keys). The advertisement
//! lasts as long as the returned `Advertisement`; dropping it sends mDNS goodbye packets.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};

use crate::{Error, Result};

/// The DNS-SD service type of Strata nodes.
pub const SERVICE_TYPE: &str = "_strata._tcp.local.";

/// TXT record keys, shared with the coordinator's browser.
pub mod txt {
    pub const ID: &str = "id";
    pub const PROTO: &str = "proto";
    pub const MEM: &str = "mem";
    pub const ADAPTER: &str = "adapter";
    pub const BACKEND: &str = "backend";
    pub const CLUSTER: &str = "cluster";
}

/// What a node tells the LAN about itself (the mDNS subset of the gRPC `NodeInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAdvert {
    pub node_id: String,
    /// Instance name: unique on the LAN, at most 63 bytes.
    pub name: String,
    /// The node's protocol version (`strata_proto::PROTOCOL_VERSION`; a field, so that
    /// tests can advertise a node of another version).
    pub protocol_version: u32,
    /// Bytes the node may use for weights and caches.
    pub usable_memory: u64,
    pub adapter: String,
    pub backend: String,
    /// The fingerprint of the node's cluster key; `None`: a node without one.
    pub cluster: Option<String>,
}

/// Which network interfaces to announce on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdvertiseConfig {
    /// Announce on exactly the interfaces holding these addresses. Empty: the interface
    /// of the bound address when it is a specific one, else every interface.
    pub interfaces: Vec<IpAddr>,
    /// Never announce on IPv6 (tests do this for determinism). A node bound to `0.0.0.0`
    /// is not reachable over IPv6 anyway, so IPv6 is off for it regardless.
    pub no_ipv6: bool,
}

/// A live advertisement; dropping it withdraws the service (mDNS goodbye).
pub struct Advertisement {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for Advertisement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Advertisement").field("fullname", &self.fullname).finish()
    }
}

impl Advertisement {
    /// The DNS-SD full name, e.g. `node1._strata._tcp.local.`.
    pub fn fullname(&self) -> &str {
        &self.fullname
    }
}

impl Drop for Advertisement {
    fn drop(&mut self) {
        // Wait (briefly) for the goodbye packets, so that a process exiting right after
        // this drop still withdraws its service instead of leaving a ghost until TTL.
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// Advertises `info` for a node serving on `addr` (all suitable interfaces).
pub fn advertise(info: &NodeAdvert, addr: SocketAddr) -> Result<Advertisement> {
    advertise_with(info, addr, &AdvertiseConfig::default())
}

/// Advertises `info` for a node serving on `addr`, on the interfaces `config` allows.
pub fn advertise_with(info: &NodeAdvert, addr: SocketAddr, config: &AdvertiseConfig) -> Result<Advertisement> {
    validate_name(&info.name)?;
    if addr.port() == 0 {
        return Err(Error::Mdns("cannot advertise port 0 (advertise after binding, with the real port)".into()));
    }
    let mdns = |what: &str, e: mdns_sd::Error| Error::Mdns(format!("{what}: {e}"));
    let daemon = ServiceDaemon::new().map_err(|e| mdns("cannot start the responder", e))?;

    let mut interfaces = config.interfaces.clone();
    if interfaces.is_empty() && !addr.ip().is_unspecified() {
        interfaces.push(addr.ip());
    }
    if !interfaces.is_empty() {
        daemon.disable_interface(IfKind::All).map_err(|e| mdns("interface selection", e))?;
        for ip in &interfaces {
            daemon.enable_interface(IfKind::Addr(*ip)).map_err(|e| mdns("interface selection", e))?;
        }
    }
    if config.no_ipv6 || addr.ip() == IpAddr::from([0, 0, 0, 0]) {
        daemon.disable_interface(IfKind::IPv6).map_err(|e| mdns("interface selection", e))?;
    }

    let host = format!("strata-{}.local.", dns_label(&info.node_id));
    let props = txt_properties(info);
    let service = if addr.ip().is_unspecified() {
        // Announce whatever addresses the enabled interfaces have, following changes.
        ServiceInfo::new(SERVICE_TYPE, &info.name, &host, "", addr.port(), &props[..])
            .map(ServiceInfo::enable_addr_auto)
    } else {
        ServiceInfo::new(SERVICE_TYPE, &info.name, &host, addr.ip(), addr.port(), &props[..])
    }
    .map_err(|e| mdns("invalid service record", e))?;
    let fullname = service.get_fullname().to_string();
    daemon.register(service).map_err(|e| mdns("cannot register the service", e))?;
    tracing::info!(name = %info.name, %addr, service = %fullname, "advertising on mDNS");
    Ok(Advertisement { daemon, fullname })
}

/// The TXT records of `info`, in a fixed order.
pub fn txt_properties(info: &NodeAdvert) -> Vec<(&'static str, String)> {
    let mut props = vec![
        (txt::ID, info.node_id.clone()),
        (txt::PROTO, info.protocol_version.to_string()),
        (txt::MEM, info.usable_memory.to_string()),
        (txt::ADAPTER, truncate(&info.adapter, 200).to_string()),
        (txt::BACKEND, info.backend.clone()),
    ];
    if let Some(fp) = &info.cluster {
        props.push((txt::CLUSTER, fp.clone()));
    }
    props
}

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 63 {
        return Err(Error::Setting(format!(
            "node name `{name}` must be 1 to 63 bytes long (it is a DNS-SD instance name)"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::Setting(format!("node name {name:?} must not contain control characters")));
    }
    Ok(())
}

/// `s` reduced to a DNS host label: lowercase letters, digits and `-`, at most 40 bytes.
fn dns_label(s: &str) -> String {
    let label: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(40).collect();
    if label.trim_matches('-').is_empty() { "node".into() } else { label }
}

/// At most `max` bytes of `s`, cut at a character boundary (a TXT string holds 255 bytes).
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert() -> NodeAdvert {
        NodeAdvert {
            node_id: "7f3a".into(),
            name: "gpu-box".into(),
            protocol_version: 1,
            usable_memory: 16 << 30,
            adapter: "NVIDIA GeForce RTX 4080".into(),
            backend: "vulkan".into(),
            cluster: Some("0123456789abcdef".into()),
        }
    }

    #[test]
    fn txt_records_carry_every_field() {
        let t = txt_properties(&advert());
        let get = |k: &str| t.iter().find(|(key, _)| *key == k).map(|(_, v)| v.as_str());
        assert_eq!(get(txt::ID), Some("7f3a"));
        assert_eq!(get(txt::PROTO), Some("1"));
        assert_eq!(get(txt::MEM), Some("17179869184"));
        assert_eq!(get(txt::ADAPTER), Some("NVIDIA GeForce RTX 4080"));
        assert_eq!(get(txt::BACKEND), Some("vulkan"));
        assert_eq!(get(txt::CLUSTER), Some("0123456789abcdef"));
        let plain = txt_properties(&NodeAdvert { cluster: None, ..advert() });
        assert!(plain.iter().all(|(k, _)| *k != txt::CLUSTER));
    }

    #[test]
    fn names_are_checked_and_labels_sanitised() {
        assert!(validate_name("node1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"x".repeat(64)).is_err());
        assert!(validate_name("a\nb").is_err());
        assert_eq!(dns_label("Node_1.Box"), "node-1-box");
        assert_eq!(dns_label("..."), "node");
        assert_eq!(truncate("héllo", 2), "h");
    }

    #[test]
    fn port_zero_is_refused_before_touching_the_network() {
        let e = advertise(&advert(), "127.0.0.1:0".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("port 0"), "{e}");
    }
}
