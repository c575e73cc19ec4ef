//! Sluice's kernel side: transparent redirect of connections from watched
//! cgroups to the local proxy, with the origin of each connection recorded
//! for the agent.
//!
//! * `cgroup/connect4`, `cgroup/connect6`: a TCP connect to a target is
//!   rewritten to the proxy and its origin saved by socket cookie; UDP
//!   "connect" to a target address is refused (no QUIC bypass).
//! * `sockops` at `TCP_CONNECT_CB` (local port known, SYN not sent yet):
//!   re-key the origin by the client's local address, which is the peer
//!   address the proxy sees in `accept()`; delete both records on close.
//! * `cgroup/getpeername4/6`: the client still sees its original peer.
//! * `cgroup/sendmsg4/6`: unconnected UDP to a target address is refused.
//! * containment (`contain.rs`): no raw or packet sockets, no leaving the
//!   watched subtree, no bpf() for watched tasks.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod contain;
#[cfg(target_arch = "bpf")]
mod prog;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Built for the host only by tooling (clippy, rust-analyzer).
}
