//! Containment: what a (possibly root) job in a watched cgroup may not do
//! because it would get around the redirect.
//!
//! * `cgroup/sock_create` (attached to the watched cgroups, no BPF LSM
//!   needed): no raw IPv4/IPv6 sockets — no hand-crafted packets to a
//!   target.
//! * BPF LSM (global, decides by "is the current task under a watched
//!   cgroup?"):
//!   - `socket_create`: no AF_PACKET / AF_XDP sockets, no raw sockets;
//!   - `inode_permission`: no write access to an interface file (e.g.
//!     `cgroup.procs`) of a strict ancestor of the job's watched cgroup.
//!     The kernel checks write permission on the *common ancestor's*
//!     `cgroup.procs` for every migration (`cgroup_attach_permissions`,
//!     also for `clone3(CLONE_INTO_CGROUP)`), so every way out of the
//!     subtree passes through this check, and moves inside it do not;
//!   - `bpf`: no bpf() at all (no detaching the node's links, no map
//!     writes, no programs of its own).
//! * raw tracepoint `sys_enter` (no BPF LSM needed, attached only where
//!   the kernel refuses LSM programs): a watched task calling
//!   socket(AF_PACKET/AF_XDP) is killed before it can use the socket.
use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_task, bpf_send_signal},
    },
    macros::{cgroup_sock, lsm, map, raw_tracepoint},
    maps::{HashMap, RingBuf},
    programs::{LsmContext, RawTracePointContext, SockContext},
};
use sluice_common::{contain_kind, stat, ContainEvent, WATCHED_MAX_LEVEL};

use crate::prog::count;

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const EPERM: i32 = 1;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_PACKET: i32 = 17;
const AF_XDP: i32 = 44;
const SOCK_RAW: i32 = 3;
/// Low bits of the socket type (the rest are SOCK_NONBLOCK/SOCK_CLOEXEC).
const SOCK_TYPE_MASK: i32 = 0xf;
const MAY_WRITE: i32 = 0x2;
const MAY_APPEND: i32 = 0x8;
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// Watched cgroups (ids = cgroup2 directory inode numbers), configured and
/// discovered by pattern. A task is watched when one of its ancestors (or
/// its own cgroup) is in here.
#[map]
static WATCHED: HashMap<u64, u32> = HashMap::with_max_entries(8192, 0);

/// cgroup subtrees the redirect leaves alone (`watch.host.exempt`).
#[map]
static EXEMPT: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);

/// Whether the current task is in an exempt subtree with no watched
/// cgroup on its path (a watched cgroup is never exempt).
#[inline(always)]
pub(crate) fn exempt() -> bool {
    let mut exempt = false;
    let mut level = 0;
    while level < WATCHED_MAX_LEVEL {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        if unsafe { WATCHED.get(&id) }.is_some() {
            return false;
        }
        if unsafe { EXEMPT.get(&id) }.is_some() {
            exempt = true;
        }
        level += 1;
    }
    exempt
}

// Struct layout of this kernel, read from its BTF by the agent at load time
// (read-only globals: the verifier sees them as constants). The cgroup
// guard stays off unless all were found.
#[unsafe(no_mangle)]
static GUARD_ENABLED: u32 = 0;
#[unsafe(no_mangle)]
static OFF_INODE_I_SB: u64 = 0;
#[unsafe(no_mangle)]
static OFF_INODE_I_PRIVATE: u64 = 0;
#[unsafe(no_mangle)]
static OFF_SB_S_MAGIC: u64 = 0;
#[unsafe(no_mangle)]
static OFF_KN_PARENT: u64 = 0;
#[unsafe(no_mangle)]
static OFF_KN_ID: u64 = 0;
/// Offset of `thread_info.status` from the task (x86: `thread_info` is
/// the task's first member); `u64::MAX`: unknown. `TS_COMPAT` there says
/// the current syscall came through the 32-bit entry (`int $0x80`).
#[unsafe(no_mangle)]
static OFF_TASK_TI_STATUS: u64 = u64::MAX;
/// `task_struct.group_leader` and `.start_boottime`; `u64::MAX`: unknown.
#[unsafe(no_mangle)]
static OFF_TASK_GROUP_LEADER: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_TASK_START_BOOTTIME: u64 = u64::MAX;

/// Nanoseconds per clock tick of `/proc/PID/stat` (USER_HZ 100).
const NS_PER_TICK: u64 = 10_000_000;

/// Whether the current task belongs to the process started at `ticks`
/// (its thread group leader's `start_boottime`, as `/proc/PID/stat`
/// field 22 gives it). `ticks` 0 or an unknown layout: not checked.
#[inline(always)]
pub(crate) fn started_at(ticks: u64) -> bool {
    let (gl, sb) = (
        global(&OFF_TASK_GROUP_LEADER),
        global(&OFF_TASK_START_BOOTTIME),
    );
    if ticks == 0 || gl == u64::MAX || sb == u64::MAX {
        return true;
    }
    // SAFETY: kernel pointers read with the probe helper.
    let start: Option<u64> = unsafe {
        let task = bpf_get_current_task();
        bpf_probe_read_kernel((task + gl) as *const u64)
            .ok()
            .and_then(|leader| bpf_probe_read_kernel((leader + sb) as *const u64).ok())
    };
    start.is_some_and(|ns| ns / NS_PER_TICK == ticks)
}

/// What the fallback did, for the agent (see `ContainEvent`).
#[map]
static CONTAIN_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[inline(always)]
fn global<T: Copy>(v: &'static T) -> T {
    // SAFETY: a static; volatile so the value set at load time is read.
    unsafe { read_volatile(v) }
}

/// Where the current task stands: the watched cgroup it is under (0:
/// none), and whether `probe` (a cgroup id) is a strict ancestor of that
/// watched one.
#[inline(always)]
fn current_watched(probe: u64) -> (u64, bool) {
    let mut probe_is_ancestor = false;
    let mut level = 0;
    while level < WATCHED_MAX_LEVEL {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        if unsafe { WATCHED.get(&id) }.is_some() {
            return (id, probe_is_ancestor);
        }
        if id == probe {
            probe_is_ancestor = true;
        }
        level += 1;
    }
    (0, false)
}

#[inline(always)]
fn in_watched() -> bool {
    current_watched(0).0 != 0
}

/// Kills the current (watched) process and tells the agent why.
#[inline(always)]
fn kill(kind: u32, counter: u32, watched_id: u64) {
    count(counter);
    // SAFETY: a helper call with a constant signal number.
    unsafe { bpf_send_signal(SIGKILL) };
    let event = ContainEvent {
        kind,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        watched_id,
        comm: bpf_get_current_comm().unwrap_or_default(),
    };
    if CONTAIN_EVENTS.output::<ContainEvent>(&event, 0).is_err() {
        count(stat::EVENTS_LOST);
    }
}

/// Where the kernel refuses BPF LSM programs (measured here: EPERM for
/// every trampoline program, and no kprobe PMU) raw tracepoints still
/// work. On `sys_enter`, a watched task is sent SIGKILL when it calls
///
/// * socket(AF_PACKET or AF_XDP, or AF_INET with SOCK_PACKET): it dies on
///   its way back to user space, before it can put a frame on the wire
///   past the redirect;
/// * bpf(): the call itself runs (nothing here can refuse it), but the
///   process dies on return, so what the call gave it (a link or map fd)
///   dies with it, and the agent stops the whole job at once;
/// * clone/clone3 with CLONE_FILES but not CLONE_THREAD, as root: a
///   process sharing the file table would outlive a sibling killed for
///   bpf() and could use the fd it got. The pending signal makes the
///   kernel abandon the fork (`copy_process` checks for it), so the child
///   never exists;
/// * pidfd_getfd(): taking the fd of a process dying for bpf().
///
/// The same calls through the 32-bit entry (`int $0x80` from a 64-bit
/// process, i386 numbers, arguments in ebx/ecx) count the same: the task's
/// TS_COMPAT says which table the number is from. Threads share the kill
/// (it is sent to the thread group). The agent
/// attaches this only where the LSM is unavailable: it runs on every
/// syscall of the host, so it returns at the first compares for others.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sluice_sys_enter(ctx: RawTracePointContext) -> i32 {
    // x32 numbers carry a marker bit; the calls are the same.
    let id: u64 = ctx.arg::<u64>(1) & !X32_SYSCALL_BIT;
    if id != SYS_BPF
        && id != SYS_SOCKET
        && id != SYS_CLONE
        && id != SYS_CLONE3
        && id != SYS_PIDFD_GETFD
        && id != SYS32_BPF
        && id != SYS32_SOCKET
        && id != SYS32_SOCKETCALL
        && id != SYS32_CLONE
    {
        return 0;
    }
    // The numbers mean other calls through the 32-bit entry (i386 102 is
    // x86_64 getuid): which table applies is the task's TS_COMPAT.
    let compat = match compat_syscall() {
        Some(c) => c,
        // Layout unknown: the i386-only numbers (unused on x86_64) are
        // still taken as i386 ones; 102 and 120 cannot be told apart.
        None => id == SYS32_BPF || id == SYS32_SOCKET,
    };
    let call = match (compat, id) {
        (false, SYS_BPF) | (true, SYS32_BPF) => Call::Bpf,
        (false, SYS_SOCKET) | (true, SYS32_SOCKET) | (true, SYS32_SOCKETCALL) => Call::Socket,
        (false, SYS_CLONE) | (true, SYS32_CLONE) => Call::Clone,
        (_, SYS_CLONE3) => Call::Clone3,
        (_, SYS_PIDFD_GETFD) => Call::FdTake,
        _ => return 0,
    };
    let (watched, _) = current_watched(0);
    if watched == 0 {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    // Arguments: rdi, rsi on x86_64; ebx, ecx through the 32-bit entry.
    let (a0, a1) = if compat {
        (PT_REGS_BX, PT_REGS_CX)
    } else {
        (PT_REGS_DI, PT_REGS_SI)
    };
    // SAFETY: `regs` is the syscall's `struct pt_regs *`; its fields are
    // read with the probe helper, never dereferenced.
    let reg = |off: u64| unsafe { bpf_probe_read_kernel((regs + off) as *const u64).unwrap_or(0) };
    let arg0 = reg(a0);
    match call {
        Call::Bpf => kill(contain_kind::BPF, stat::BPF_KILLED, watched),
        Call::FdTake => kill(contain_kind::FD_TAKE, stat::FD_TAKE_KILLED, watched),
        Call::Socket => {
            let (family, ty) = if id == SYS32_SOCKETCALL {
                // socketcall(SYS_SOCKET, u32 args[3]).
                if arg0 as u32 != SOCKETCALL_SOCKET {
                    return 0;
                }
                let args = reg(a1) as u32 as u64;
                // SAFETY: user pointers read with the probe helper.
                unsafe {
                    (
                        bpf_probe_read_user(args as *const u32).unwrap_or(0) as i32,
                        bpf_probe_read_user((args + 4) as *const u32).unwrap_or(0) as i32,
                    )
                }
            } else {
                (arg0 as i32, reg(a1) as i32)
            };
            // socket(AF_INET, SOCK_PACKET) is a packet socket (the kernel
            // turns it into AF_PACKET after this point).
            let packet = family == AF_PACKET
                || family == AF_XDP
                || (family == AF_INET as i32 && ty & SOCK_TYPE_MASK == SOCK_PACKET);
            if packet {
                kill(
                    contain_kind::PACKET_SOCKET,
                    stat::PACKET_SOCKET_KILLED,
                    watched,
                );
            }
        }
        Call::Clone | Call::Clone3 => {
            // clone(flags, ...) / clone3(struct clone_args *, size): flags
            // is the first u64 of clone_args.
            let flags = match call {
                Call::Clone if compat => arg0 as u32 as u64,
                Call::Clone => arg0,
                // SAFETY: a user pointer read with the probe helper.
                _ => unsafe {
                    bpf_probe_read_user(
                        (if compat { arg0 as u32 as u64 } else { arg0 }) as *const u64,
                    )
                    .unwrap_or(0)
                },
            };
            // Only root can get a link or map fd from bpf(); sanitizers'
            // CLONE_FILES helpers in unprivileged jobs are left alone.
            let uid = bpf_get_current_uid_gid() as u32;
            if flags & CLONE_FILES != 0 && flags & CLONE_THREAD == 0 && uid == 0 {
                kill(
                    contain_kind::SHARED_FILES,
                    stat::SHARED_FILES_KILLED,
                    watched,
                );
            }
        }
    }
    0
}

#[derive(Clone, Copy)]
enum Call {
    Bpf,
    Socket,
    Clone,
    Clone3,
    FdTake,
}

/// Whether the current syscall came through the 32-bit entry (`None`:
/// the layout is unknown).
#[inline(always)]
fn compat_syscall() -> Option<bool> {
    let off = global(&OFF_TASK_TI_STATUS);
    if off == u64::MAX {
        return None;
    }
    // SAFETY: the current task pointer, read with the probe helper.
    let status: u32 = unsafe {
        let task = bpf_get_current_task();
        bpf_probe_read_kernel((task + off) as *const u32).ok()?
    };
    Some(status & TS_COMPAT != 0)
}

const SIGKILL: u32 = 9;
/// x86_64 syscall numbers.
const SYS_SOCKET: u64 = 41;
const SYS_CLONE: u64 = 56;
const SYS_BPF: u64 = 321;
const SYS_CLONE3: u64 = 435;
const SYS_PIDFD_GETFD: u64 = 438;
/// i386 numbers (the 32-bit entry, `int $0x80`); clone3 and pidfd_getfd
/// have the same numbers in both tables.
const SYS32_SOCKETCALL: u64 = 102;
const SYS32_CLONE: u64 = 120;
const SYS32_BPF: u64 = 357;
const SYS32_SOCKET: u64 = 359;
const SOCKETCALL_SOCKET: u32 = 1;
const X32_SYSCALL_BIT: u64 = 0x4000_0000;
const TS_COMPAT: u32 = 0x0002;
const SOCK_PACKET: i32 = 10;
const CLONE_FILES: u64 = 0x400;
const CLONE_THREAD: u64 = 0x10000;
/// Offsets in x86_64 `struct pt_regs` (r15 r14 r13 r12 bp bx r11 r10 r9
/// r8 ax cx dx si di orig_ax ...).
const PT_REGS_BX: u64 = 5 * 8;
const PT_REGS_CX: u64 = 11 * 8;
const PT_REGS_SI: u64 = 13 * 8;
const PT_REGS_DI: u64 = 14 * 8;

/// Attached to the watched cgroups: no raw IP sockets.
#[cgroup_sock(sock_create)]
pub fn sluice_sock_create(ctx: SockContext) -> i32 {
    let (family, ty) = unsafe { ((*ctx.sock).family, (*ctx.sock).type_) };
    if (family == AF_INET || family == AF_INET6) && ty == SOCK_RAW as u32 {
        count(stat::RAW_SOCKET_REFUSED);
        return REFUSE;
    }
    ALLOW
}

#[lsm(hook = "socket_create")]
pub fn sluice_lsm_socket_create(ctx: LsmContext) -> i32 {
    // socket_create(int family, int type, int protocol, int kern), then
    // the verdict of the BPF LSM programs before us.
    let family: i32 = ctx.arg(0);
    let ty: i32 = ctx.arg(1);
    let kern: i32 = ctx.arg(3);
    let prev: i32 = ctx.arg(4);
    if prev != 0 {
        return prev;
    }
    if kern != 0 {
        return 0;
    }
    let packet = family == AF_PACKET || family == AF_XDP;
    let raw = (ty & SOCK_TYPE_MASK) == SOCK_RAW && (family == 2 || family == 10);
    if !(packet || raw) || !in_watched() {
        return 0;
    }
    count(if packet {
        stat::PACKET_SOCKET_REFUSED
    } else {
        stat::RAW_SOCKET_REFUSED
    });
    -EPERM
}

#[lsm(hook = "bpf")]
pub fn sluice_lsm_bpf(ctx: LsmContext) -> i32 {
    // bpf(int cmd, union bpf_attr *attr, unsigned int size, bool kernel)
    let kernel: u64 = ctx.arg(3);
    let prev: i32 = ctx.arg(4);
    if prev != 0 {
        return prev;
    }
    if kernel & 0xff != 0 || !in_watched() {
        return 0;
    }
    count(stat::BPF_REFUSED);
    -EPERM
}

#[lsm(hook = "inode_permission")]
pub fn sluice_lsm_inode_permission(ctx: LsmContext) -> i32 {
    // inode_permission(struct inode *inode, int mask)
    let mask: i32 = ctx.arg(1);
    let prev: i32 = ctx.arg(2);
    if prev != 0 {
        return prev;
    }
    if mask & (MAY_WRITE | MAY_APPEND) == 0 || global(&GUARD_ENABLED) == 0 {
        return 0;
    }
    let inode: *const u8 = ctx.arg(0);
    match cgroup_of_file(inode) {
        Some(cgroup) => {
            let (watched, ancestor) = current_watched(cgroup);
            if watched != 0 && ancestor {
                count(stat::CGROUP_ESCAPE_REFUSED);
                return -EPERM;
            }
            0
        }
        None => 0,
    }
}

/// For an inode on the cgroup2 file system: the id of the cgroup whose
/// directory holds it (kernfs: `inode->i_private` is the kernfs node; its
/// parent's id is the cgroup id).
#[inline(always)]
fn cgroup_of_file(inode: *const u8) -> Option<u64> {
    unsafe {
        let sb: *const u8 =
            bpf_probe_read_kernel(inode.add(global(&OFF_INODE_I_SB) as usize) as *const *const u8)
                .ok()?;
        let magic: u64 =
            bpf_probe_read_kernel(sb.add(global(&OFF_SB_S_MAGIC) as usize) as *const u64).ok()?;
        if magic != CGROUP2_SUPER_MAGIC {
            return None;
        }
        let kn: *const u8 = bpf_probe_read_kernel(
            inode.add(global(&OFF_INODE_I_PRIVATE) as usize) as *const *const u8
        )
        .ok()?;
        if kn.is_null() {
            return None;
        }
        let parent: *const u8 =
            bpf_probe_read_kernel(kn.add(global(&OFF_KN_PARENT) as usize) as *const *const u8)
                .ok()?;
        if parent.is_null() {
            return None;
        }
        bpf_probe_read_kernel(parent.add(global(&OFF_KN_ID) as usize) as *const u64).ok()
    }
}
