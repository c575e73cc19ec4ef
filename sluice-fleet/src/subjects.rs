//! NATS subjects and buckets of the fleet's messages. Node names become
//! one subject token each (`token`), as in the evidence subjects.

/// Held requests and statements, and their ends (node → console, core
/// NATS; heartbeats repeat what is still held, so a console that missed
/// one catches up).
pub fn held(node: &str) -> String {
    format!("sluice.fleet.held.{}", token(node))
}
pub const HELD_ALL: &str = "sluice.fleet.held.*";

/// Signed decisions (console → node, request/reply: the node answers
/// whether it accepted the decision).
pub fn decide(node: &str) -> String {
    format!("sluice.fleet.decide.{}", token(node))
}

/// Heartbeats (node → console, core NATS).
pub fn heartbeat(node: &str) -> String {
    format!("sluice.fleet.heartbeat.{}", token(node))
}
pub const HEARTBEAT_ALL: &str = "sluice.fleet.heartbeat.*";

/// The fleet's signed suspension list: a JetStream stream in the
/// key-value layout (`KV_<bucket>`, key `list`), read at the stream level
/// as the bundle bucket is (Debian's nats-server 2.9 does not speak the
/// client's key-value API).
pub const SUSPENSIONS_BUCKET: &str = "SLUICE_SUSPENSIONS";
pub const SUSPENSIONS_KEY: &str = "list";

pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// A name as one subject token: letters, digits, `-` and `_` only (the
/// evidence subjects use the same rule).
pub fn token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if t.is_empty() {
        "_".into()
    } else {
        t
    }
}
