//! The server's text outside rows: ErrorResponse and NoticeResponse
//! fields, and NotificationResponse channels and payloads. They quote
//! values (`invalid input syntax for type integer: "4111..."`, a `RAISE
//! NOTICE` of a column, a `pg_notify` payload), so the result rules'
//! patterns mask them like DataRow text, in place and length-preserving.
use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};

use super::{codec, mask, PgError};
use crate::{policy::ResultMask, scan::MASK};

/// A rewrite of one message body: `None` when nothing matched.
pub type Rewrite =
    fn(&[u8], &ResultMask, &mut BTreeMap<String, u64>) -> Result<Option<Bytes>, PgError>;

/// Error and notice fields that are codes, numbers or the server's own
/// source position, never data: kept as they are.
fn is_code(field: u8) -> bool {
    matches!(field, b'S' | b'V' | b'C' | b'P' | b'p' | b'F' | b'L' | b'R')
}

/// Masks an ErrorResponse or NoticeResponse body; `None` when nothing
/// matched. A body that is not a well-formed field list is an error
/// (fail closed: it is not forwarded unread).
pub fn fields(
    body: &[u8],
    plan: &ResultMask,
    masked: &mut BTreeMap<String, u64>,
) -> Result<Option<Bytes>, PgError> {
    let mut out = BytesMut::from(body);
    let mut changed = false;
    let mut at = 0;
    loop {
        let Some(&code) = body.get(at) else {
            return Err(PgError::Protocol(
                "error or notice without its terminating NUL".into(),
            ));
        };
        if code == 0 {
            break;
        }
        let start = at + 1;
        let len = body[start..]
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| PgError::Protocol("error or notice field without its NUL".into()))?;
        if !is_code(code) {
            changed |= mask_in_place(&mut out[start..start + len], plan, masked)?;
        }
        at = start + len + 1;
    }
    Ok(changed.then(|| out.freeze()))
}

/// Masks a NotificationResponse (process id, channel, payload).
pub fn notification(
    body: &[u8],
    plan: &ResultMask,
    masked: &mut BTreeMap<String, u64>,
) -> Result<Option<Bytes>, PgError> {
    let mut rest = body;
    let pid = codec::take_i32(&mut rest)?;
    let channel = take_raw(&mut rest)?;
    let payload = take_raw(&mut rest)?;
    let mut channel = channel.to_vec();
    let mut payload = payload.to_vec();
    let a = mask_in_place(&mut channel, plan, masked)?;
    let b = mask_in_place(&mut payload, plan, masked)?;
    if !(a || b) {
        return Ok(None);
    }
    let mut out = BytesMut::with_capacity(body.len());
    out.put_i32(pid);
    out.put_slice(&channel);
    out.put_u8(0);
    out.put_slice(&payload);
    out.put_u8(0);
    out.put_slice(rest);
    Ok(Some(out.freeze()))
}

/// A NUL-terminated string's bytes, as they are.
fn take_raw<'a>(data: &mut &'a [u8]) -> Result<&'a [u8], PgError> {
    let end = data
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| PgError::Protocol("notification without its NUL".into()))?;
    let (s, rest) = data.split_at(end);
    *data = &rest[1..];
    Ok(s)
}

fn mask_in_place(
    v: &mut [u8],
    plan: &ResultMask,
    masked: &mut BTreeMap<String, u64>,
) -> Result<bool, PgError> {
    let spans = mask::spans(v, plan, masked)?;
    for (a, b) in &spans {
        v[*a..*b].fill(MASK);
    }
    Ok(!spans.is_empty())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{identity::WorkloadIdentity, policy::CompiledPolicy};

    fn plan() -> ResultMask {
        let p = CompiledPolicy::compile(
            "version: 1\nname: x\nrules:\n  - id: keys\n    on: result\n    packs: [secrets]\n    action: mask\n",
            "t",
            8192,
        )
        .unwrap();
        Arc::new(p)
            .result_mask("db", &WorkloadIdentity::default())
            .unwrap()
    }

    #[test]
    fn text_fields_are_masked_and_codes_kept() {
        let key = "AKIAQ3EGRXZ7PLM4VB2K";
        let body = format!(
            "SERROR\0C22P02\0Minvalid input syntax for type integer: \"{key}\"\0Dkey {key}\0P8\0\0"
        );
        let mut masked = BTreeMap::new();
        let out = fields(body.as_bytes(), &plan(), &mut masked)
            .unwrap()
            .unwrap();
        let stars = "*".repeat(key.len());
        assert_eq!(
            &out[..],
            format!(
                "SERROR\0C22P02\0Minvalid input syntax for type integer: \"{stars}\"\0Dkey {stars}\0P8\0\0"
            )
            .as_bytes()
        );
        assert_eq!(masked.get("keys"), Some(&2));
        assert!(fields(b"SNOTICE\0Mhello\0\0", &plan(), &mut masked)
            .unwrap()
            .is_none());
        for bad in [&b"SERROR\0Mno end"[..], b"SERROR\0", b""] {
            assert!(fields(bad, &plan(), &mut masked).is_err());
        }

        let mut n = vec![0, 0, 0, 42];
        n.extend_from_slice(format!("ch\0{key}\0").as_bytes());
        let out = notification(&n, &plan(), &mut masked).unwrap().unwrap();
        assert_eq!(&out[..4], &[0, 0, 0, 42]);
        assert_eq!(&out[4..], format!("ch\0{stars}\0").as_bytes());
        assert!(notification(&[0, 0, 0, 1, b'c', 0], &plan(), &mut masked).is_err());
    }
}
