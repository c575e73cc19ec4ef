//! What a node and the console say to each other over NATS besides the
//! evidence: requests held for approval, the console's signed decisions
//! on them, the fleet's signed suspension list, and heartbeats; and the
//! Ed25519 key files both sign with. A lower layer: it imports nothing of
//! the node or the console, so both read one definition of each message.
pub mod approval;
pub mod heartbeat;
pub mod keys;
pub mod signed;
pub mod subjects;
pub mod suspension;
