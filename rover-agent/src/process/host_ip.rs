//! The node's own addresses: the IP reported as `host_ip`, and the addresses of named interfaces
//! that host-rule templates ask for (`{{.Rover.HostIPV4 "eth0"}}`).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why the node's IP could not be found.
#[derive(Debug, thiserror::Error)]
pub enum HostIpError {
    #[error("cannot list the network interfaces (getifaddrs)")]
    Interfaces(#[source] io::Error),
    #[error("no interface has a non-loopback IPv4 address; pass the node's IP explicitly")]
    NoAddress,
}

/// The IPv4 and IPv6 address of one interface (the first of each family; for IPv6 a global
/// address is preferred over a link-local one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceIps {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// The node's IP: `override_ip` when given (Kubernetes passes the downward-API `status.hostIP`,
/// host mode an IP from the environment), else the IPv4 of the interface that holds the default
/// route (`/proc/net/route`), else the first non-loopback IPv4 of an interface that is up.
/// Never `127.0.0.1`: a backend cannot tell hosts apart by it.
pub fn host_ip(override_ip: Option<IpAddr>) -> Result<IpAddr, HostIpError> {
    if let Some(ip) = override_ip {
        return Ok(ip);
    }
    let interfaces = interface_addresses().map_err(HostIpError::Interfaces)?;
    // Without a readable route table (no procfs in the namespace) the fallback below still holds.
    let default_interface = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|table| default_route_interface(&table));
    let via_default_route = default_interface
        .and_then(|name| interfaces.iter().find(|address| address.name == name))
        .and_then(|address| address.ips.v4);
    via_default_route
        .or_else(|| {
            interfaces
                .iter()
                .filter(|address| address.up && !address.loopback)
                .find_map(|address| address.ips.v4)
        })
        .filter(|ip| !ip.is_loopback())
        .map(IpAddr::V4)
        .ok_or(HostIpError::NoAddress)
}

/// Addresses of every interface, by name, as template rendering looks them up.
pub(crate) fn interface_ips_by_name() -> io::Result<HashMap<String, InterfaceIps>> {
    Ok(interface_addresses()?
        .into_iter()
        .map(|address| (address.name, address.ips))
        .collect())
}

/// The interface of the lowest-metric default route (destination and mask 0, flag RTF_UP) in a
/// `/proc/net/route` table.
fn default_route_interface(route_table: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    route_table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
            let metric: u32 = fields.get(6)?.parse().ok()?;
            let is_default = *fields.get(1)? == "00000000" && *fields.get(7)? == "00000000";
            (is_default && flags & RTF_UP != 0).then(|| (metric, fields[0].to_owned()))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, name)| name)
}

struct InterfaceAddress {
    name: String,
    up: bool,
    loopback: bool,
    ips: InterfaceIps,
}

/// One entry per interface, in the kernel's order, with its first address of each family.
fn interface_addresses() -> io::Result<Vec<InterfaceAddress>> {
    let list = IfAddrs::new()?;
    let mut interfaces: Vec<InterfaceAddress> = Vec::new();
    let mut entry = list.head;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, alive until `list` drops.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let index = match interfaces.iter().position(|known| known.name == name) {
            Some(index) => index,
            None => {
                interfaces.push(InterfaceAddress {
                    name,
                    up: ifa.ifa_flags & libc::IFF_UP as u32 != 0,
                    loopback: ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0,
                    ips: InterfaceIps::default(),
                });
                interfaces.len() - 1
            }
        };
        let ips = &mut interfaces[index].ips;
        match socket_ip(ifa.ifa_addr) {
            Some(IpAddr::V4(ip)) if ips.v4.is_none() => ips.v4 = Some(ip),
            Some(IpAddr::V6(ip)) => {
                let better = match ips.v6 {
                    None => true,
                    Some(known) => is_link_local(known) && !is_link_local(ip),
                };
                if better {
                    ips.v6 = Some(ip);
                }
            }
            _ => {}
        }
    }
    Ok(interfaces)
}

fn is_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

fn socket_ip(address: *const libc::sockaddr) -> Option<IpAddr> {
    if address.is_null() {
        return None;
    }
    // SAFETY: getifaddrs gives a valid sockaddr whose family says which struct it is.
    match i32::from(unsafe { (*address).sa_family }) {
        libc::AF_INET => {
            // SAFETY: AF_INET addresses are sockaddr_in.
            let v4 = unsafe { &*address.cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            // SAFETY: AF_INET6 addresses are sockaddr_in6.
            let v6 = unsafe { &*address.cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// The list getifaddrs allocates, freed on drop.
struct IfAddrs {
    head: *mut libc::ifaddrs,
}

impl IfAddrs {
    fn new() -> io::Result<Self> {
        let mut head = std::ptr::null_mut();
        // SAFETY: getifaddrs writes a list head (or null) into `head` and reports failure with -1.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { head })
    }
}

impl Drop for IfAddrs {
    fn drop(&mut self) {
        if !self.head.is_null() {
            // SAFETY: `head` came from getifaddrs and is freed once.
            unsafe { libc::freeifaddrs(self.head) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_interface_is_the_lowest_metric_default_route() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
            wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            down0\t00000000\t0100000A\t0002\t0\t0\t1\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_interface(table).as_deref(), Some("eth0"));
        assert_eq!(default_route_interface("Iface\tDestination\n"), None);
    }

    #[test]
    fn override_wins_and_detection_never_gives_loopback() {
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        assert_eq!(host_ip(Some(ip)).unwrap(), ip);
        // A sandbox may have no network at all: then the error says so.
        match host_ip(None) {
            Ok(ip) => assert!(!ip.is_loopback()),
            Err(error) => assert!(matches!(error, HostIpError::NoAddress)),
        }
    }

    #[test]
    fn loopback_interface_is_listed_with_its_address() {
        let interfaces = interface_ips_by_name().unwrap();
        assert_eq!(interfaces["lo"].v4, Some(Ipv4Addr::LOCALHOST));
    }
}
