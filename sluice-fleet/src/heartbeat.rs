//! A node's heartbeat: what the console's node page shows, and what the
//! node still holds (so a console that missed a `Held` notice, or started
//! after it, lists it within one beat).
use serde::{Deserialize, Serialize};

use crate::approval::Held;

/// Seconds between beats; the console calls a node silent after three.
pub const INTERVAL_SECS: u64 = 5;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    pub at_ms: u64,
    /// The node's `sluice status`, as the control socket answers it
    /// (version, policy in force, spool, shipping, containment, …).
    pub status: serde_json::Value,
    /// Every event below this sequence number is on the node's disk.
    pub durable_seq: u64,
    /// The last signed checkpoint, as the node keeps it (number, event
    /// sequence number and hash, time, signature).
    #[serde(default)]
    pub checkpoint: Option<serde_json::Value>,
    /// The node's checkpoint key id.
    #[serde(default)]
    pub node_kid: Option<String>,
    /// Version of the fleet suspension list in force (0: none yet).
    pub suspensions_version: u64,
    /// Whether the node's control socket still takes decisions.
    pub local_decisions: bool,
    pub held: Vec<Held>,
}
