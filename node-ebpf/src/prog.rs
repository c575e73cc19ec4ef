use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, generated::bpf_get_netns_cookie, generated::bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use sluice_common::{
    stat, ClientKey, Origin, ProxyConfig, TargetKeyV4, TargetKeyV6, TargetValue, AF_INET, AF_INET6,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
/// Bits of the port part of a target key.
const PORT_BITS: u32 = 16;

#[map]
static PROXY: Array<ProxyConfig> = Array::with_max_entries(1, 0);

/// Target set for TCP: (port, address prefix). Port 0 = any port.
#[map]
static TARGETS_V4: LpmTrie<TargetKeyV4, TargetValue> = LpmTrie::with_max_entries(16384, 0);
#[map]
static TARGETS_V6: LpmTrie<TargetKeyV6, TargetValue> = LpmTrie::with_max_entries(16384, 0);

/// Target addresses regardless of port, for refusing UDP (QUIC, HTTP/3).
#[map]
static TARGET_ADDRS_V4: LpmTrie<[u8; 4], TargetValue> = LpmTrie::with_max_entries(16384, 0);
#[map]
static TARGET_ADDRS_V6: LpmTrie<[u8; 16], TargetValue> = LpmTrie::with_max_entries(16384, 0);

/// Origins by socket cookie, written at connect(), read by getpeername().
#[map]
static ORIGIN_BY_COOKIE: LruHashMap<u64, Origin> = LruHashMap::with_max_entries(65536, 0);

/// Origins by the client's local address, read by the agent after accept().
#[map]
static ORIGIN_BY_CLIENT: LruHashMap<ClientKey, Origin> = LruHashMap::with_max_entries(65536, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
pub(crate) fn count(idx: u32) {
    if let Some(p) = STATS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

/// What a connect to a target from this task gets: redirected to the
/// proxy, let through (the node's own, an exempt subtree), or refused
/// (no proxy configured: fail closed).
enum Verdict {
    Redirect(ProxyConfig),
    LetThrough,
    Refuse,
}

#[inline(always)]
fn verdict() -> Verdict {
    let Some(cfg) = PROXY.get(0) else {
        return Verdict::Refuse;
    };
    if is_node(cfg) {
        return Verdict::LetThrough;
    }
    if cfg.has_exempt != 0 && crate::contain::exempt() {
        return Verdict::LetThrough;
    }
    if cfg.enabled == 0 {
        return Verdict::Refuse;
    }
    Verdict::Redirect(*cfg)
}

/// The node's own process: its pid and its start time (a process that
/// gets a dead node's pid is not it).
#[inline(always)]
fn is_node(cfg: &ProxyConfig) -> bool {
    (bpf_get_current_pid_tgid() >> 32) as u32 == cfg.node_tgid
        && crate::contain::started_at(cfg.node_start)
}

/// A connect that reaches the proxy's own address: the redirect of a
/// program attached lower in the hierarchy (this socket has an origin
/// already) or the node; anything else is refused, so that no connection
/// can be taken for another's origin.
#[inline(always)]
fn direct_to_proxy_allowed(ctx: &SockAddrContext, cfg: &ProxyConfig) -> bool {
    if is_node(cfg) {
        return true;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { ORIGIN_BY_COOKIE.get(&cookie) }.is_some()
}

#[inline(always)]
fn target_v4(addr: [u8; 4], port_be: [u8; 2]) -> Option<TargetValue> {
    let key = Key::new(
        PORT_BITS + 32,
        TargetKeyV4 {
            port: port_be,
            addr,
        },
    );
    if let Some(v) = TARGETS_V4.get(&key) {
        return Some(*v);
    }
    let any = Key::new(PORT_BITS + 32, TargetKeyV4 { port: [0, 0], addr });
    TARGETS_V4.get(&any).copied()
}

#[inline(always)]
fn target_v6(addr: [u8; 16], port_be: [u8; 2]) -> Option<TargetValue> {
    let key = Key::new(
        PORT_BITS + 128,
        TargetKeyV6 {
            port: port_be,
            addr,
        },
    );
    if let Some(v) = TARGETS_V6.get(&key) {
        return Some(*v);
    }
    let any = Key::new(PORT_BITS + 128, TargetKeyV6 { port: [0, 0], addr });
    TARGETS_V6.get(&any).copied()
}

#[inline(always)]
fn is_target_addr_v4(addr: [u8; 4]) -> bool {
    TARGET_ADDRS_V4.get(&Key::new(32, addr)).is_some()
}

#[inline(always)]
fn is_target_addr_v6(addr: [u8; 16]) -> bool {
    TARGET_ADDRS_V6.get(&Key::new(128, addr)).is_some()
}

/// Reads `user_ip6` one 32-bit word at a time: the verifier only accepts
/// narrow, aligned loads of context fields.
#[inline(always)]
unsafe fn read_user_ip6(sa: *const bpf_sock_addr) -> [u32; 4] {
    unsafe {
        let p = addr_of!((*sa).user_ip6) as *const u32;
        [
            read_volatile(p),
            read_volatile(p.add(1)),
            read_volatile(p.add(2)),
            read_volatile(p.add(3)),
        ]
    }
}

#[inline(always)]
unsafe fn write_user_ip6(sa: *mut bpf_sock_addr, words: [u32; 4]) {
    unsafe {
        let p = addr_of_mut!((*sa).user_ip6) as *mut u32;
        write_volatile(p, words[0]);
        write_volatile(p.add(1), words[1]);
        write_volatile(p.add(2), words[2]);
        write_volatile(p.add(3), words[3]);
    }
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let (a, c, d, e) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    b[0..4].copy_from_slice(&a);
    b[4..8].copy_from_slice(&c);
    b[8..12].copy_from_slice(&d);
    b[12..16].copy_from_slice(&e);
    b
}

/// `::ffff:a.b.c.d` (words in network order as stored in memory).
#[inline(always)]
fn v4_mapped(w: &[u32; 4]) -> Option<u32> {
    if w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        Some(w[3])
    } else {
        None
    }
}

#[inline(always)]
fn new_origin(
    dst_addr: [u8; 16],
    dst_port: u16,
    family: u16,
    target_id: u32,
    cookie: u64,
) -> Origin {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    Origin {
        dst_addr,
        dst_port,
        family,
        target_id,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        cookie,
        comm,
    }
}

/// Refuse connections from a network namespace other than the proxy's:
/// rewriting them would send them to *their own* loopback, where nothing
/// (or something else) listens.
#[inline(always)]
fn same_netns(ctx: &SockAddrContext, cfg: &ProxyConfig) -> bool {
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    cookie == cfg.netns_cookie
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (ty, ip, port) = unsafe { ((*sa).type_, (*sa).user_ip4, (*sa).user_port) };
    let addr = ip.to_ne_bytes();
    let port_be = (port as u16).to_ne_bytes();
    if ty == SOCK_DGRAM {
        if is_target_addr_v4(addr) || target_v4(addr, port_be).is_some() {
            if matches!(verdict(), Verdict::LetThrough) {
                return ALLOW;
            }
            count(stat::UDP_REFUSED);
            return REFUSE;
        }
        return ALLOW;
    }
    if ty != SOCK_STREAM {
        return ALLOW;
    }
    if let Some(cfg) = PROXY.get(0) {
        if addr == cfg.addr4 && port_be == cfg.port && !direct_to_proxy_allowed(&ctx, cfg) {
            count(stat::PROXY_DIRECT_REFUSED);
            return REFUSE;
        }
    }
    let Some(target) = target_v4(addr, port_be) else {
        return ALLOW;
    };
    // A target while no proxy is configured: fail closed.
    let cfg = match verdict() {
        Verdict::Redirect(cfg) => cfg,
        Verdict::LetThrough => return ALLOW,
        Verdict::Refuse => return REFUSE,
    };
    if !same_netns(&ctx, &cfg) {
        count(stat::FOREIGN_NETNS_REFUSED);
        return REFUSE;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut dst = [0u8; 16];
    dst[0..4].copy_from_slice(&addr);
    let origin = new_origin(
        dst,
        u16::from_be_bytes(port_be),
        AF_INET,
        target.target_id,
        cookie,
    );
    if ORIGIN_BY_COOKIE.insert(&cookie, &origin, 0).is_err() {
        return REFUSE;
    }
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(cfg.addr4);
        (*sa).user_port = u16::from_ne_bytes(cfg.port) as u32;
    }
    count(stat::REDIRECTED);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (ty, port) = unsafe { ((*sa).type_, (*sa).user_port) };
    let words = unsafe { read_user_ip6(sa) };
    let port_be = (port as u16).to_ne_bytes();
    let mapped = v4_mapped(&words);
    let bytes = words_to_bytes(words);

    // UDP is refused to any port of a target address, and to a target's
    // (address, port) pairs (all-egress targets are only in the latter).
    let is_target_addr = match mapped {
        Some(v4) => {
            is_target_addr_v4(v4.to_ne_bytes()) || target_v4(v4.to_ne_bytes(), port_be).is_some()
        }
        None => is_target_addr_v6(bytes) || target_v6(bytes, port_be).is_some(),
    };
    if ty == SOCK_DGRAM {
        if is_target_addr {
            if matches!(verdict(), Verdict::LetThrough) {
                return ALLOW;
            }
            count(stat::UDP_REFUSED);
            return REFUSE;
        }
        return ALLOW;
    }
    if ty != SOCK_STREAM {
        return ALLOW;
    }
    if let Some(cfg) = PROXY.get(0) {
        let direct = match mapped {
            Some(v4) => v4.to_ne_bytes() == cfg.addr4,
            None => bytes == cfg.addr6,
        };
        if direct && port_be == cfg.port && !direct_to_proxy_allowed(&ctx, cfg) {
            count(stat::PROXY_DIRECT_REFUSED);
            return REFUSE;
        }
    }
    let target = match mapped {
        Some(v4) => target_v4(v4.to_ne_bytes(), port_be),
        None => target_v6(bytes, port_be),
    };
    let Some(target) = target else {
        return ALLOW;
    };
    let cfg = match verdict() {
        Verdict::Redirect(cfg) => cfg,
        Verdict::LetThrough => return ALLOW,
        Verdict::Refuse => return REFUSE,
    };
    if !same_netns(&ctx, &cfg) {
        count(stat::FOREIGN_NETNS_REFUSED);
        return REFUSE;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (dst, family, new_words) = match mapped {
        Some(v4) => {
            let mut dst = [0u8; 16];
            dst[0..4].copy_from_slice(&v4.to_ne_bytes());
            let proxy_mapped = [
                0,
                0,
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                u32::from_ne_bytes(cfg.addr4),
            ];
            (dst, AF_INET, proxy_mapped)
        }
        None => {
            let a = cfg.addr6;
            let proxy6 = [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ];
            (bytes, AF_INET6, proxy6)
        }
    };
    let origin = new_origin(
        dst,
        u16::from_be_bytes(port_be),
        family,
        target.target_id,
        cookie,
    );
    if ORIGIN_BY_COOKIE.insert(&cookie, &origin, 0).is_err() {
        return REFUSE;
    }
    unsafe {
        write_user_ip6(sa, new_words);
        (*sa).user_port = u16::from_ne_bytes(cfg.port) as u32;
    }
    count(stat::REDIRECTED);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sluice_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let (addr, port_be) = (ip.to_ne_bytes(), (port as u16).to_ne_bytes());
    if (is_target_addr_v4(addr) || target_v4(addr, port_be).is_some())
        && !matches!(verdict(), Verdict::LetThrough)
    {
        count(stat::UDP_REFUSED);
        return REFUSE;
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sluice_sendmsg6(ctx: SockAddrContext) -> i32 {
    let words = unsafe { read_user_ip6(ctx.sock_addr) };
    let port_be = (unsafe { (*ctx.sock_addr).user_port } as u16).to_ne_bytes();
    let hit = match v4_mapped(&words) {
        Some(v4) => {
            is_target_addr_v4(v4.to_ne_bytes()) || target_v4(v4.to_ne_bytes(), port_be).is_some()
        }
        None => {
            let bytes = words_to_bytes(words);
            is_target_addr_v6(bytes) || target_v6(bytes, port_be).is_some()
        }
    };
    if hit && !matches!(verdict(), Verdict::LetThrough) {
        count(stat::UDP_REFUSED);
        return REFUSE;
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn sluice_getpeername4(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(o) = unsafe { ORIGIN_BY_COOKIE.get(&cookie) } {
        if o.family == AF_INET {
            let sa = ctx.sock_addr;
            let d = o.dst_addr;
            unsafe {
                (*sa).user_ip4 = u32::from_ne_bytes([d[0], d[1], d[2], d[3]]);
                (*sa).user_port = u16::to_be(o.dst_port) as u32;
            }
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn sluice_getpeername6(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(o) = unsafe { ORIGIN_BY_COOKIE.get(&cookie) } {
        let d = o.dst_addr;
        let words = if o.family == AF_INET {
            [
                0,
                0,
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                u32::from_ne_bytes([d[0], d[1], d[2], d[3]]),
            ]
        } else {
            [
                u32::from_ne_bytes([d[0], d[1], d[2], d[3]]),
                u32::from_ne_bytes([d[4], d[5], d[6], d[7]]),
                u32::from_ne_bytes([d[8], d[9], d[10], d[11]]),
                u32::from_ne_bytes([d[12], d[13], d[14], d[15]]),
            ]
        };
        let sa = ctx.sock_addr;
        unsafe {
            write_user_ip6(sa, words);
            (*sa).user_port = u16::to_be(o.dst_port) as u32;
        }
    }
    ALLOW
}

#[inline(always)]
fn client_key(ctx: &SockOpsContext) -> ClientKey {
    let port = ctx.local_port() as u16;
    if ctx.family() == AF_INET as u32 {
        let mut addr = [0u8; 16];
        addr[0..4].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
        return ClientKey {
            addr,
            port,
            family: AF_INET,
            _pad: 0,
        };
    }
    let words = ctx.local_ip6();
    if let Some(v4) = v4_mapped(&words) {
        let mut addr = [0u8; 16];
        addr[0..4].copy_from_slice(&v4.to_ne_bytes());
        return ClientKey {
            addr,
            port,
            family: AF_INET,
            _pad: 0,
        };
    }
    ClientKey {
        addr: words_to_bytes(words),
        port,
        family: AF_INET6,
        _pad: 0,
    }
}

#[sock_ops]
pub fn sluice_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(origin) = unsafe { ORIGIN_BY_COOKIE.get(&cookie) } {
            let origin = *origin;
            let key = client_key(&ctx);
            // Attached to a job cgroup and the root, this runs twice for
            // the job's sockets: once is enough.
            if unsafe { ORIGIN_BY_CLIENT.get(&key) }.is_some_and(|o| o.cookie == cookie) {
                return 0;
            }
            if ORIGIN_BY_CLIENT.insert(&key, &origin, 0).is_ok() {
                count(stat::REKEYED);
            }
            // Ask for state callbacks so the records go away on close.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if unsafe { ORIGIN_BY_COOKIE.get(&cookie) }.is_some() {
            let key = client_key(&ctx);
            let _ = ORIGIN_BY_CLIENT.remove(&key);
            let _ = ORIGIN_BY_COOKIE.remove(&cookie);
            count(stat::CLOSED);
        }
    }
    0
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
