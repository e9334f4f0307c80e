//! Links between guests: QEMU socket netdevs on 127.0.0.1.

use crate::{Result, TestbedError};
use std::time::{Duration, Instant};

/// One guest network interface. Interfaces appear in the guest as `eth0`, `eth1`, ... in
/// the order they are added, with the address given here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// How the QEMU side of the link is made.
    pub backend: NicBackend,
    /// Address with prefix inside the guest, e.g. `10.99.0.1/24`.
    pub address: String,
}

/// The QEMU side of a guest link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicBackend {
    /// This guest listens on 127.0.0.1:port; exactly one peer connects.
    Listen(u16),
    /// This guest connects to a peer listening on 127.0.0.1:port.
    Connect(u16),
    /// All guests on the same multicast group share one segment (a hub).
    Multicast(u16),
}

impl Nic {
    /// The listening end of a point-to-point link.
    pub fn listen(port: u16, address: &str) -> Self {
        Self {
            backend: NicBackend::Listen(port),
            address: address.into(),
        }
    }
    /// The connecting end of a point-to-point link.
    pub fn connect(port: u16, address: &str) -> Self {
        Self {
            backend: NicBackend::Connect(port),
            address: address.into(),
        }
    }
    /// A port on a multicast hub shared by every guest using the same port.
    pub fn hub(port: u16, address: &str) -> Self {
        Self {
            backend: NicBackend::Multicast(port),
            address: address.into(),
        }
    }

    pub(crate) fn qemu_netdev(&self, id: &str) -> String {
        match self.backend {
            NicBackend::Listen(port) => format!("socket,id={id},listen=127.0.0.1:{port}"),
            NicBackend::Connect(port) => format!("socket,id={id},connect=127.0.0.1:{port}"),
            NicBackend::Multicast(port) => {
                format!("socket,id={id},mcast=230.0.0.1:{port},localaddr=127.0.0.1")
            }
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| TestbedError::Io {
            what: "finding a free port on 127.0.0.1".into(),
            source,
        })?;
    let port = listener
        .local_addr()
        .map_err(|source| TestbedError::Io {
            what: "reading the bound port".into(),
            source,
        })?
        .port();
    Ok(port)
}

/// Waits until something listens on 127.0.0.1:`port`, without connecting to it (a QEMU
/// socket netdev accepts a single connection, so a probe would steal it).
pub fn wait_for_listener(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let wanted = format!("0100007F:{port:04X}");
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let listening = table.lines().any(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1);
            let state = fields.nth(1);
            local == Some(wanted.as_str()) && state == Some("0A")
        });
        if listening {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(TestbedError::Io {
                what: format!("nothing listens on 127.0.0.1:{port} after {timeout:?}"),
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_is_seen_without_connecting() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        wait_for_listener(port, Duration::from_secs(2)).unwrap();
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "the probe must not connect");
    }

    #[test]
    fn missing_listener_times_out() {
        let port = free_tcp_port().unwrap();
        assert!(wait_for_listener(port, Duration::from_millis(100)).is_err());
    }
}
