//! Types shared by the kernel programs (`node-ebpf`) and the agent
//! (`node-agent`). Every type here is `#[repr(C)]`, `Copy` and padding-free
//! so it can live in a BPF map and be read byte for byte from userspace.
#![no_std]

/// Address family tags stored in map keys and values (Linux values).
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Key of the target LPM tries. The port comes first with a full-length
/// prefix so that an entry matches one port exactly (port 0 = any port) and
/// the address part is matched by its CIDR prefix.
/// `prefix_len` of an LPM key = 16 + address prefix bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetKeyV4 {
    /// Port in network byte order.
    pub port: [u8; 2],
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetKeyV6 {
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

/// Value of a target entry: which configured target it belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetValue {
    /// Index of the target in the agent's configuration.
    pub target_id: u32,
    pub flags: u32,
}

/// Where the kernel must send redirected connections, and which network
/// namespace the proxy lives in (connections from another netns cannot
/// reach it and are refused instead of being rewritten to their own
/// loopback).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// IPv4 listen address, network byte order as stored in sockaddr.
    pub addr4: [u8; 4],
    /// IPv6 listen address.
    pub addr6: [u8; 16],
    /// Listen port, network byte order.
    pub port: [u8; 2],
    pub enabled: u8,
    /// 1 when the EXEMPT map holds any cgroup (skips the walk otherwise).
    pub has_exempt: u8,
    /// `bpf_get_netns_cookie` of the proxy's namespace.
    pub netns_cookie: u64,
    /// The node's own process (its connections to targets are never
    /// redirected: with the programs on the root cgroup they would loop).
    pub node_tgid: u32,
    pub _pad2: u32,
    /// The node's start time (`/proc/self/stat` field 22, clock ticks
    /// since boot): with the tgid it names the node's process, so a
    /// process that gets the pid of a dead node is not taken for it.
    /// 0: not checked (the kernel layout is unknown).
    pub node_start: u64,
}

/// What the kernel knew about a redirected connection when the client
/// called `connect()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Original destination address; IPv4 in the first 4 bytes.
    pub dst_addr: [u8; 16],
    /// Original destination port, host byte order.
    pub dst_port: u16,
    /// AF_INET or AF_INET6 of the original destination (v4-mapped = AF_INET).
    pub family: u16,
    pub target_id: u32,
    /// Thread id (kernel pid) and process id (kernel tgid).
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub cookie: u64,
    pub comm: [u8; 16],
}

/// Key of the origin-by-client-address map: the client's local address and
/// port as the proxy sees them in `accept()`'s peer address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientKey {
    /// IPv4 in the first 4 bytes (v4-mapped clients are stored as IPv4).
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// How deep in the cgroup tree the kernel programs look for a watched
/// ancestor of the current task (levels below the cgroup2 root).
pub const WATCHED_MAX_LEVEL: u32 = 32;

/// Counters exported by the kernel programs (index into a per-CPU array).
pub mod stat {
    pub const REDIRECTED: u32 = 0;
    pub const UDP_REFUSED: u32 = 1;
    pub const FOREIGN_NETNS_REFUSED: u32 = 2;
    pub const REKEYED: u32 = 3;
    pub const CLOSED: u32 = 4;
    /// Raw IPv4/IPv6 sockets refused to watched tasks.
    pub const RAW_SOCKET_REFUSED: u32 = 5;
    /// AF_PACKET / AF_XDP sockets refused to watched tasks (BPF LSM).
    pub const PACKET_SOCKET_REFUSED: u32 = 6;
    /// Writes to a cgroup file above the watched subtree refused (BPF LSM).
    pub const CGROUP_ESCAPE_REFUSED: u32 = 7;
    /// bpf() calls refused to watched tasks (BPF LSM).
    pub const BPF_REFUSED: u32 = 8;
    /// Watched tasks killed for creating an AF_PACKET / AF_XDP socket
    /// (kprobe fallback where the kernel refuses BPF LSM programs).
    pub const PACKET_SOCKET_KILLED: u32 = 9;
    /// Watched tasks killed for calling bpf() (same fallback).
    pub const BPF_KILLED: u32 = 10;
    /// Watched root tasks killed for cloning a process that shares their
    /// file table (it could use a bpf() fd its killed sibling obtained).
    pub const SHARED_FILES_KILLED: u32 = 11;
    /// Watched tasks killed for taking another process's fd
    /// (`pidfd_getfd`).
    pub const FD_TAKE_KILLED: u32 = 12;
    /// Containment events lost because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 13;
    /// TCP connects straight to the proxy's own address and port from a
    /// hooked cgroup (only the redirect may bring a connection there: a
    /// direct one could be taken for an earlier connection's origin).
    pub const PROXY_DIRECT_REFUSED: u32 = 14;
    pub const COUNT: u32 = 15;

    /// Each counter's name, by index: the metrics label (`event`) and,
    /// prefixed `kernel_`, the status field. One list, so a new counter
    /// cannot be missing from either.
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "udp_refused",
        "foreign_netns_refused",
        "rekeyed",
        "closed",
        "raw_sockets_refused",
        "packet_sockets_refused",
        "cgroup_escapes_refused",
        "bpf_refused",
        "packet_sockets_killed",
        "bpf_killed",
        "shared_files_killed",
        "fd_take_killed",
        "events_lost",
        "proxy_direct_refused",
    ];
}

/// What the kernel fallback (no BPF LSM) did to a watched task, sent to
/// the agent over a ring buffer so it can answer within microseconds:
/// stop the whole job, re-check its links, audit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContainEvent {
    /// One of `contain_kind`.
    pub kind: u32,
    /// Process id (kernel tgid) of the killed task.
    pub tgid: u32,
    /// The task's own cgroup.
    pub cgroup_id: u64,
    /// The watched cgroup it is under (the job).
    pub watched_id: u64,
    pub comm: [u8; 16],
}

/// `ContainEvent::kind`.
pub mod contain_kind {
    pub const BPF: u32 = 1;
    pub const PACKET_SOCKET: u32 = 2;
    pub const SHARED_FILES: u32 = 3;
    pub const FD_TAKE: u32 = 4;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, contain only integers and byte arrays,
    // and have no implicit padding (checked by the size tests below).
    unsafe impl aya::Pod for super::TargetKeyV4 {}
    unsafe impl aya::Pod for super::TargetKeyV6 {}
    unsafe impl aya::Pod for super::TargetValue {}
    unsafe impl aya::Pod for super::ProxyConfig {}
    unsafe impl aya::Pod for super::Origin {}
    unsafe impl aya::Pod for super::ClientKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<TargetKeyV4>(), 6);
        assert_eq!(size_of::<TargetKeyV6>(), 18);
        assert_eq!(size_of::<TargetValue>(), 8);
        assert_eq!(size_of::<ProxyConfig>(), 4 + 16 + 2 + 2 + 8 + 4 + 4 + 8);
        assert_eq!(size_of::<Origin>(), 16 + 2 + 2 + 4 * 5 + 8 + 8 + 16);
        assert_eq!(size_of::<ClientKey>(), 24);
        assert_eq!(size_of::<ContainEvent>(), 4 + 4 + 8 + 8 + 16);
    }
}
