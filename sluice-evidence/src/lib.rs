//! The evidence format the node writes and the console reads: the hash
//! chain's link rule, the spool line shipped to NATS JetStream, and a
//! follower that checks a node's chain as its events arrive. A lower
//! layer: it imports nothing of the node or the console.
pub mod chain;
pub mod checkpoint;
pub mod follow;
pub mod har;
pub mod line;
pub mod shown;
