//! Sluice's node agent as a library: the `sluice` binary (`main.rs`) is a
//! thin CLI over it, and benchmarks and examples use its parts directly.
pub mod addr;
pub mod approvals;
pub mod config;
pub mod console;
pub mod contain;
pub mod control;
pub mod daemon;
pub mod doctor;
pub mod export;
pub mod http;
pub mod identity;
pub use sluice_fleet::keys;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod postgres;
pub mod proxy;
pub mod record;
pub mod redirect;
pub mod scan;
pub mod session;
pub mod spool;
pub mod suspend;
pub mod targets;
pub mod tls;
pub mod watch;
