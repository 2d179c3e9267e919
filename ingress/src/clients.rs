//! Public connections per client address, so that one client cannot take
//! the gateway's whole connection cap. IPv6 clients count by their /64 (one
//! host usually holds a whole /64); IPv4-mapped IPv6 counts as the IPv4
//! address. The table only holds addresses with connections open, so it
//! never outgrows the gateway's cap on all connections.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// Whom a connection is counted against: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let net = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(Ipv6Addr::from(net)))
                }
            },
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// How many public connections each client has open, under one cap.
pub struct ClientTable {
    max: usize,
    open: Mutex<HashMap<ClientKey, usize>>,
}

impl ClientTable {
    pub fn new(max_per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max_per_client,
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn max_per_client(&self) -> usize {
        self.max
    }

    /// A slot for one more connection from `ip`, held while it lives;
    /// `None` when the client already has its cap's worth open.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let key = ClientKey::of(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            if *n == 0 {
                open.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: self.clone(),
            key,
        })
    }

    /// Connections open now from `ip`'s client.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&ClientKey::of(ip)).copied().unwrap_or(0)
    }

    /// Clients with at least one connection open.
    pub fn clients(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One connection counted against its client; released on drop.
pub struct ClientSlot {
    table: Arc<ClientTable>,
    key: ClientKey,
}

impl ClientSlot {
    pub fn client(&self) -> ClientKey {
        self.key
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Entry::Occupied(mut e) = open.entry(self.key) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_client_gets_its_own_cap_and_slots_come_back() {
        let t = ClientTable::new(2);
        let a1 = t.try_admit(ip("127.0.0.1")).unwrap();
        let _a2 = t.try_admit(ip("127.0.0.1")).unwrap();
        assert!(t.try_admit(ip("127.0.0.1")).is_none());
        let _b = t.try_admit(ip("127.0.0.2")).unwrap();
        assert_eq!((t.open(ip("127.0.0.1")), t.clients()), (2, 2));
        drop(a1);
        assert!(t.try_admit(ip("127.0.0.1")).is_some());
    }

    #[test]
    fn the_table_forgets_clients_with_nothing_open() {
        let t = ClientTable::new(3);
        let slots: Vec<_> = (1..=50)
            .map(|i| t.try_admit(ip(&format!("192.0.2.{i}"))).unwrap())
            .collect();
        assert_eq!(t.clients(), 50);
        drop(slots);
        assert_eq!(t.clients(), 0);
        // A cap of 0 admits no one and leaves nothing behind.
        let none = ClientTable::new(0);
        assert!(none.try_admit(ip("192.0.2.1")).is_none());
        assert_eq!(none.clients(), 0);
    }

    #[test]
    fn ipv6_counts_by_slash_64_and_mapped_ipv4_as_ipv4() {
        let rows = [
            ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
            ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
            ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("192.0.2.7", "192.0.2.7"),
            ("::1", "::/64"),
        ];
        for (addr, key) in rows {
            assert_eq!(ClientKey::of(ip(addr)).to_string(), key, "{addr}");
        }
        let t = ClientTable::new(1);
        let _held = t.try_admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(t.try_admit(ip("2001:db8:1:2::99")).is_none());
        assert!(t.try_admit(ip("2001:db8:1:3::1")).is_some());
        let _v4 = t.try_admit(ip("192.0.2.7")).unwrap();
        assert!(t.try_admit(ip("::ffff:192.0.2.7")).is_none());
    }
}
