//! End-to-end tests: the real `sluice` binary, the real kernel (root,
//! cgroup v2, network namespaces) and real clients. Every test builds its
//! own cgroup, its own namespace holding a fake remote server, and its own
//! node. They need root and fail loudly without it; they never skip.
mod capacity;
mod connect;
mod console;
mod containment;
mod documents;
mod evidence;
mod fleet;
mod foundation;
mod fronting;
mod harness;
mod host;
mod hostile;
mod masking;
mod pg;
mod pg_regress;
mod pg_side;
mod policy;
mod postgres;
#[path = "../../node-agent/tests/samples/mod.rs"]
mod samples;
mod tls;
mod tools;
