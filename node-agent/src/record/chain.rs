//! The hash chain's links and their binary encoding.
//!
//! A link commits to its content through a digest, and to the previous link
//! through its hash:
//!
//! ```text
//! digest = SHA-256(len‖at_ms, len‖connection, len‖kind, len‖body)
//! hash   = SHA-256("sluice-chain-v1" ‖ prev ‖ seq ‖ digest)
//! ```
//!
//! Splitting content from linkage lets an export prove that a session's
//! events lead to a signed checkpoint while giving only the digests (not
//! the content) of other sessions' events in between.
//!
//! Stored form (the payload of a record-log frame, `log.rs`):
//! `[1][seq][at_ms][connection][prev][hash][kind_len
//! u16][kind][body]`, integers big-endian, `body` the record's JSON as
//! written (no re-serialisation: `verify` hashes the stored bytes).
//! Events written before this format (JSON objects, hex hashes over a
//! canonical JSON body) are still read and verified.

pub use sluice_evidence::chain::{content_digest, link_hash, Hash, GENESIS};

const V1: u8 = 1;
const FIXED: usize = 1 + 8 + 8 + 8 + 32 + 32 + 2;

/// One decoded link.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    pub seq: u64,
    pub at_ms: u64,
    pub connection: u64,
    pub kind: String,
    /// The record's JSON (canonical JSON for legacy events).
    pub body: Vec<u8>,
    pub prev: Hash,
    pub hash: Hash,
    /// Written in the JSON format that preceded this one.
    pub legacy: bool,
}

/// A link whose content is encoded and digested, waiting for its place in
/// the chain. The expensive part of an append (the body copied, SHA-256
/// over it) is done here, outside the chain's lock; `seal` writes the
/// sequence number, the previous hash and the link hash into the frame
/// under it.
pub struct Draft {
    /// Where the link starts in `out`.
    at: usize,
    digest: Hash,
}

/// Appends the stored form of a new link to `out` with its sequence
/// number and hashes left blank for `Draft::seal`.
#[cfg(test)]
pub fn draft_into(
    out: &mut Vec<u8>,
    at_ms: u64,
    connection: u64,
    kind: &str,
    body: &[u8],
) -> Draft {
    let write = |out: &mut Vec<u8>| {
        out.extend_from_slice(body);
        Ok::<(), std::convert::Infallible>(())
    };
    match draft_with(out, at_ms, connection, kind, write) {
        Ok(d) => d,
        Err(e) => match e {},
    }
}

/// `draft_into` with the body written in place by `write` (the record
/// serialised straight into the frame: no copy, no buffer of its own).
pub fn draft_with<E>(
    out: &mut Vec<u8>,
    at_ms: u64,
    connection: u64,
    kind: &str,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<Draft, E> {
    let kind_bytes = &kind.as_bytes()[..kind.len().min(u16::MAX as usize)];
    let at = out.len();
    out.push(V1);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&at_ms.to_be_bytes());
    out.extend_from_slice(&connection.to_be_bytes());
    out.extend_from_slice(&[0; 64]);
    out.extend_from_slice(&(kind_bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(kind_bytes);
    let body_at = out.len();
    if let Err(e) = write(out) {
        out.truncate(at);
        return Err(e);
    }
    let digest = content_digest(at_ms, connection, kind, &out[body_at..]);
    Ok(Draft { at, digest })
}

impl Draft {
    /// Puts the link after `prev` as number `seq`; returns its hash.
    pub fn seal(&self, out: &mut [u8], seq: u64, prev: &Hash) -> Hash {
        let hash = link_hash(prev, seq, &self.digest);
        let b = &mut out[self.at..];
        b[1..9].copy_from_slice(&seq.to_be_bytes());
        b[25..57].copy_from_slice(prev);
        b[57..89].copy_from_slice(&hash);
        hash
    }
}

/// Appends the stored form of a new link to `out`; returns its hash.
#[cfg(test)]
pub fn encode_into(
    out: &mut Vec<u8>,
    seq: u64,
    at_ms: u64,
    connection: u64,
    kind: &str,
    body: &[u8],
    prev: &Hash,
) -> Hash {
    draft_into(out, at_ms, connection, kind, body).seal(out, seq, prev)
}

impl Link {
    /// Parses a stored event (either format). Does not check the hash.
    pub fn decode(bytes: &[u8]) -> Result<Link, String> {
        match bytes.first() {
            Some(&V1) => Self::decode_v1(bytes),
            Some(b'{') => Self::decode_legacy(bytes),
            _ => Err("unknown event encoding".into()),
        }
    }

    fn decode_v1(b: &[u8]) -> Result<Link, String> {
        if b.len() < FIXED {
            return Err("event shorter than its header".into());
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let hash_at = |i: usize| -> Hash { b[i..i + 32].try_into().unwrap_or(GENESIS) };
        let kind_len = u16::from_be_bytes([b[FIXED - 2], b[FIXED - 1]]) as usize;
        let kind = b
            .get(FIXED..FIXED + kind_len)
            .ok_or("event kind runs past its end")?;
        Ok(Link {
            seq: u64_at(1),
            at_ms: u64_at(9),
            connection: u64_at(17),
            prev: hash_at(25),
            hash: hash_at(57),
            kind: String::from_utf8(kind.to_vec()).map_err(|_| "event kind is not UTF-8")?,
            body: b[FIXED + kind_len..].to_vec(),
            legacy: false,
        })
    }

    fn decode_legacy(b: &[u8]) -> Result<Link, String> {
        #[derive(serde::Deserialize)]
        struct Legacy {
            seq: u64,
            at_ms: u64,
            connection: u64,
            kind: String,
            body: serde_json::Value,
            prev: String,
            hash: String,
        }
        let ev: Legacy = serde_json::from_slice(b).map_err(|e| e.to_string())?;
        let hex32 = |s: &str| -> Result<Hash, String> {
            hex::decode(s)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| format!("`{s}` is not a SHA-256 hash"))
        };
        Ok(Link {
            seq: ev.seq,
            at_ms: ev.at_ms,
            connection: ev.connection,
            body: serde_json::to_vec(&ev.body).map_err(|e| e.to_string())?,
            kind: ev.kind,
            prev: hex32(&ev.prev)?,
            hash: hex32(&ev.hash)?,
            legacy: true,
        })
    }

    /// True when the stored hash is the one its content and `prev` give.
    pub fn hash_ok(&self) -> bool {
        let expect = if self.legacy {
            legacy_hash(
                &hex::encode(self.prev),
                self.seq,
                self.at_ms,
                self.connection,
                &self.kind,
                &self.body,
            )
        } else {
            link_hash(
                &self.prev,
                self.seq,
                &content_digest(self.at_ms, self.connection, &self.kind, &self.body),
            )
        };
        expect == self.hash
    }

    pub fn digest(&self) -> Hash {
        content_digest(self.at_ms, self.connection, &self.kind, &self.body)
    }

    /// The API view of this link.
    pub fn to_event(&self) -> super::Event {
        super::Event {
            seq: self.seq,
            at_ms: self.at_ms,
            connection: self.connection,
            kind: self.kind.clone(),
            body: serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null),
            prev: hex::encode(self.prev),
            hash: hex::encode(self.hash),
        }
    }
}

/// The hash of the JSON event format (hex `prev`, canonical body).
fn legacy_hash(prev: &str, seq: u64, at_ms: u64, connection: u64, kind: &str, body: &[u8]) -> Hash {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        prev.as_bytes(),
        &seq.to_be_bytes(),
        &at_ms.to_be_bytes(),
        &connection.to_be_bytes(),
        kind.as_bytes(),
        body,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body serialised in place gives the frame and digest a copied
    /// one gives; a failed serialisation leaves nothing behind.
    #[test]
    fn draft_with_matches_draft_into_and_undoes_a_failure() {
        let body = br#"{"a":"b\"c"}"#;
        let (mut a, mut b) = (vec![9u8; 3], vec![9u8; 3]);
        let da = draft_into(&mut a, 5, 6, "exchange", body);
        let db = draft_with(&mut b, 5, 6, "exchange", |o| {
            serde_json::to_writer(o, &serde_json::json!({"a": "b\"c"}))
        })
        .unwrap();
        assert_eq!(da.seal(&mut a, 1, &GENESIS), db.seal(&mut b, 1, &GENESIS));
        assert_eq!(a, b);
        let mut c = vec![9u8; 3];
        let r = draft_with(&mut c, 5, 6, "exchange", |o| {
            o.extend_from_slice(b"partial");
            Err("no")
        });
        assert!(r.is_err());
        assert_eq!(c, vec![9u8; 3]);
    }

    #[test]
    fn encode_decode_roundtrip_and_hash() {
        let mut out = Vec::new();
        let h = encode_into(&mut out, 7, 1000, 3, "exchange", br#"{"a":1}"#, &GENESIS);
        let l = Link::decode(&out).unwrap();
        assert_eq!((l.seq, l.at_ms, l.connection), (7, 1000, 3));
        assert_eq!(l.kind, "exchange");
        assert_eq!(l.body, br#"{"a":1}"#);
        assert_eq!(l.hash, h);
        assert!(l.hash_ok());
        // One changed byte in the body breaks the hash.
        let n = out.len();
        out[n - 2] = b'2';
        assert!(!Link::decode(&out).unwrap().hash_ok());
        // Truncated headers do not parse.
        assert!(Link::decode(&out[..20]).is_err());
    }

    #[test]
    fn legacy_json_events_verify() {
        let body = serde_json::json!({"b": 2, "a": 1});
        let canonical = serde_json::to_string(&body).unwrap();
        let hash = legacy_hash(
            &hex::encode(GENESIS),
            0,
            5,
            1,
            "connection.open",
            canonical.as_bytes(),
        );
        let ev = serde_json::json!({
            "seq": 0, "at_ms": 5, "connection": 1, "kind": "connection.open",
            "body": body, "prev": hex::encode(GENESIS), "hash": hex::encode(hash),
        });
        let l = Link::decode(&serde_json::to_vec(&ev).unwrap()).unwrap();
        assert!(l.legacy && l.hash_ok());
    }
}
