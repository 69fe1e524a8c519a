//! The node's north-south devices: the interfaces whose traffic from outside the tc programs
//! translate (NodePort, LoadBalancer IPs, externalIPs), and the addresses a NodePort answers on.
//!
//! `--devices eth0,eth1` names them; without it, the interface holding `--node-ip` is used (the
//! address a cloud load balancer or a client outside the cluster sends to). Each device's first
//! IPv4 address is the source of SNATed connections to backends on other nodes.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use aya::maps::{HashMap as AyaHashMap, MapData};
use proxy_common::DeviceValue;
use tracing::info;

use super::loader::DatapathError;

/// A device the tc programs attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// Its IPv4 addresses, the first one used for SNAT.
    pub addrs: Vec<Ipv4Addr>,
}

/// Every interface of this network namespace with its IPv4 addresses, in kernel order.
fn interfaces() -> Result<Vec<(String, Vec<Ipv4Addr>)>, DatapathError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| DatapathError::Devices(format!("getifaddrs: {e}")))?;
    let mut out: Vec<(String, Vec<Ipv4Addr>)> = Vec::new();
    for a in addrs {
        let v4 = a
            .address
            .as_ref()
            .and_then(|s| s.as_sockaddr_in())
            .map(|s| s.ip());
        let i = match out.iter().position(|(n, _)| *n == a.interface_name) {
            Some(i) => i,
            None => {
                out.push((a.interface_name.clone(), Vec::new()));
                out.len() - 1
            }
        };
        if let Some(ip) = v4 {
            out[i].1.push(ip);
        }
    }
    Ok(out)
}

/// Resolves `--devices` (or, when empty, the interface holding `node_ip`).
///
/// An empty result means no north-south datapath: neither devices nor a node IP were given.
pub fn resolve(names: &[String], node_ip: Option<Ipv4Addr>) -> Result<Vec<Device>, DatapathError> {
    let all = interfaces()?;
    let wanted: Vec<String> = if names.is_empty() {
        let Some(ip) = node_ip else {
            return Ok(Vec::new());
        };
        match all.iter().find(|(_, a)| a.contains(&ip)) {
            Some((n, _)) => vec![n.clone()],
            None => {
                return Err(DatapathError::Devices(format!(
                    "no interface holds the node IP {ip}; name the node's external interfaces with --devices"
                )));
            }
        }
    } else {
        names.to_vec()
    };
    let mut out = Vec::new();
    for name in wanted {
        let Some((_, addrs)) = all.iter().find(|(n, _)| *n == name) else {
            return Err(DatapathError::Devices(format!(
                "--devices: no interface {name:?} in this network namespace (have: {})",
                all.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if addrs.is_empty() {
            return Err(DatapathError::Devices(format!(
                "--devices: {name} has no IPv4 address to SNAT with"
            )));
        }
        let ifindex = nix::net::if_::if_nametoindex(name.as_str())
            .map_err(|e| DatapathError::Devices(format!("{name}: {e}")))?;
        out.push(Device {
            name,
            ifindex,
            addrs: addrs.clone(),
        });
    }
    Ok(out)
}

/// Makes the device and node-address maps hold exactly `devices` (and `node_ip`).
pub fn program(
    devices: &[Device],
    node_ip: Option<Ipv4Addr>,
    dev_map: &mut AyaHashMap<MapData, u32, DeviceValue>,
    addr_map: &mut AyaHashMap<MapData, u32, u32>,
) -> Result<(), DatapathError> {
    let err =
        |map: &'static str| move |e: aya::maps::MapError| DatapathError::Map(map, e.to_string());
    let addrs: BTreeSet<u32> = devices
        .iter()
        .flat_map(|d| d.addrs.iter())
        .chain(node_ip.iter())
        .map(|a| u32::from(*a).to_be())
        .collect();
    for d in devices {
        let v = DeviceValue {
            addr_be: u32::from(d.addrs[0]).to_be(),
        };
        dev_map
            .insert(d.ifindex, v, 0)
            .map_err(err(proxy_common::MAP_DEVICES))?;
    }
    for a in &addrs {
        addr_map
            .insert(*a, 1, 0)
            .map_err(err(proxy_common::MAP_NODE_ADDRS))?;
    }
    let stale_devs: Vec<u32> = dev_map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !devices.iter().any(|d| d.ifindex == *k))
        .collect();
    for k in stale_devs {
        let _ = dev_map.remove(&k);
    }
    let stale_addrs: Vec<u32> = addr_map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !addrs.contains(k))
        .collect();
    for k in stale_addrs {
        let _ = addr_map.remove(&k);
    }
    info!(
        devices = %devices.iter().map(|d| format!("{}({})", d.name, d.addrs[0])).collect::<Vec<_>>().join(","),
        node_addresses = addrs.len(),
        "north-south devices"
    );
    Ok(())
}
