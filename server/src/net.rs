//! Who a request comes from, for per-address limits: the peer address, or, behind trusted
//! reverse proxies, the right-most `X-Forwarded-For` entry that a trusted proxy added. The
//! left-most entries are whatever the client chose to send and are never believed. Addresses
//! are limited as keys: IPv4 by address, IPv6 by /64 (one customer's whole prefix).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Which reverse proxies are believed about the client's address. Part of [`crate::Config`].
#[derive(Clone, Debug, clap::Args)]
pub struct ProxySettings {
    /// How many reverse proxies in front of the server append the address they see to
    /// `X-Forwarded-For` (nginx alone: 1; a cloud load balancer then nginx: 2). The client is the
    /// entry that many hops from the right; entries further left are whatever the client sent.
    /// 0: the TCP peer is the client.
    #[arg(long, env = "WADI_TRUSTED_PROXIES", default_value_t = 0)]
    pub trusted_proxies: usize,

    /// Or: the networks of the trusted proxies, comma-separated (`10.0.0.0/8,fd00::/8`); the
    /// client is the right-most `X-Forwarded-For` hop outside them.
    #[arg(long, env = "WADI_TRUSTED_PROXY_CIDRS", value_delimiter = ',')]
    pub trusted_proxy_cidrs: Vec<Cidr>,

    /// Deprecated: the same as `--trusted-proxies 1`.
    #[arg(long, env = "WADI_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,
}

/// An IP network (`10.0.0.0/8`, `fd00::/8`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.network, canonical(addr)) {
            (IpAddr::V4(network), IpAddr::V4(addr)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(addr) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(addr)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(addr) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network = canonical(
            addr.parse::<IpAddr>()
                .map_err(|_| format!("{text:?} is not an address or CIDR"))?,
        );
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= max)
                .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?,
        };
        Ok(Self { network, prefix })
    }
}

/// Which proxies in front of the server are trusted to append to `X-Forwarded-For`.
#[derive(Debug, Clone, Default)]
pub struct ProxyTrust {
    /// This many hops, counted from the server (nginx alone: 1).
    pub hops: usize,
    /// Or: any hop whose address is in these networks.
    pub networks: Vec<Cidr>,
}

impl ProxyTrust {
    /// The client's address given the TCP peer and the `X-Forwarded-For` header.
    pub fn client_addr(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let peer = canonical(peer);
        if self.hops == 0 && self.networks.is_empty() {
            return peer;
        }
        // The chain from the client to us: each proxy appended the address it saw.
        let mut chain: Vec<Option<IpAddr>> = forwarded_for
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| entry.parse::<IpAddr>().ok().map(canonical))
            .collect();
        chain.push(Some(peer));
        let index = if self.hops > 0 {
            chain.len().saturating_sub(1 + self.hops)
        } else {
            let mut index = chain.len() - 1;
            while index > 0
                && chain[index].is_some_and(|hop| self.networks.iter().any(|n| n.contains(hop)))
            {
                index -= 1;
            }
            index
        };
        // An entry that is not an address was not written by a proxy we trust: use the peer.
        chain[index].unwrap_or(peer)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The key an address is rate-limited by: IPv4 as is, IPv6 by its /64 (a single host usually
/// holds a whole /64, so per-address limits on IPv6 would limit nothing).
pub fn limit_key(addr: IpAddr) -> IpAddr {
    match canonical(addr) {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// The address reported when the peer is unknown (never in practice: axum provides it).
pub const UNKNOWN: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

impl ProxySettings {
    /// Which proxies' `X-Forwarded-For` entries are believed.
    pub fn trust(&self) -> ProxyTrust {
        let hops = if self.trusted_proxies == 0 && self.trust_forwarded_for {
            1
        } else {
            self.trusted_proxies
        };
        ProxyTrust {
            hops,
            networks: self.trusted_proxy_cidrs.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_hop() {
        let peer = ip("10.0.0.5");
        let none = ProxyTrust::default();
        assert_eq!(
            none.client_addr(peer, Some("6.6.6.6")),
            peer,
            "no trust: the peer"
        );
        let one = ProxyTrust {
            hops: 1,
            networks: Vec::new(),
        };
        // The client sent "6.6.6.6" itself; nginx appended what it saw.
        assert_eq!(
            one.client_addr(peer, Some("6.6.6.6, 203.0.113.7")),
            ip("203.0.113.7")
        );
        assert_eq!(one.client_addr(peer, None), peer, "no header: the peer");
        let two = ProxyTrust {
            hops: 2,
            networks: Vec::new(),
        };
        assert_eq!(
            two.client_addr(peer, Some("6.6.6.6, 203.0.113.7, 10.0.0.9")),
            ip("203.0.113.7")
        );
        let networks = ProxyTrust {
            hops: 0,
            networks: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        };
        assert_eq!(
            networks.client_addr(peer, Some("6.6.6.6, 198.51.100.1, 10.1.2.3")),
            ip("198.51.100.1")
        );
        assert_eq!(
            networks.client_addr(peer, Some("garbage, 10.1.2.3")),
            peer,
            "an entry no trusted proxy wrote"
        );
    }

    #[test]
    fn ipv6_is_limited_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa::1")),
            limit_key(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:2::1")),
            limit_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(limit_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(limit_key(ip("192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn cidrs_parse_and_match() {
        let net: Cidr = "192.168.0.0/16".parse().unwrap();
        assert!(net.contains(ip("192.168.4.2")));
        assert!(!net.contains(ip("192.169.0.1")));
        assert!("10.0.0.1".parse::<Cidr>().unwrap().contains(ip("10.0.0.1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }
}
