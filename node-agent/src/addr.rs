//! Distinct types for the addresses of a redirected connection, so the
//! client's address, the destination it meant to reach and the proxy's own
//! listen address cannot be mixed up (as in linkerd2-proxy).
use std::{fmt, net::SocketAddr};

use serde::{Deserialize, Serialize};

/// Where the client meant to connect, recovered from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrigDstAddr(pub SocketAddr);

/// The client's own address (its local address, our peer address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientAddr(pub SocketAddr);

/// An address the proxy listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProxyAddr(pub SocketAddr);

macro_rules! display {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}
display!(OrigDstAddr, ClientAddr, ProxyAddr);

impl ClientAddr {
    /// v4-mapped peers (`::ffff:127.0.0.1`) as plain IPv4, as the kernel
    /// programs key them.
    pub fn canonical(self) -> SocketAddr {
        match self.0 {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                None => self.0,
            },
            v4 => v4,
        }
    }
}
