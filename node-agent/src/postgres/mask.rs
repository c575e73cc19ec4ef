//! Result masking: DataRow values under `on: result` rules (COPY rows:
//! `copy.rs`). A column whose name matches a rule's `columns` glob is masked
//! whole; other text values are scanned with the rules' patterns and
//! their matches masked in place. Masks keep the value's length (`*`), so
//! only rows whose values become NULL change size, and every length
//! written is recomputed. Binary-format values: text-like types (text,
//! varchar, char, name, json, xml, bytea) are their bytes on the wire and
//! are scanned like text; jsonb past its version byte. A binary value of
//! a masked column, or of a type the node cannot read (a record, an
//! array, a custom type...), is sent as NULL, never as it was.
use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};

use super::{codec, Field, PgError};
use crate::{policy::ResultMask, scan::MASK};

/// Parses a RowDescription.
pub fn row_description(body: &[u8]) -> Result<Vec<Field>, PgError> {
    let mut rest = body;
    let n = codec::take_i16(&mut rest)?.max(0) as usize;
    let mut fields = Vec::with_capacity(n.min(1600));
    for _ in 0..n {
        let name = codec::cstr(&mut rest)?;
        // table oid, column number, type oid, type size, type modifier
        codec::take_bytes(&mut rest, 4 + 2)?;
        let type_oid = codec::take_i32(&mut rest)? as u32;
        codec::take_bytes(&mut rest, 2 + 4)?;
        let format = codec::take_i16(&mut rest)?;
        fields.push(Field {
            name,
            type_oid,
            format,
        });
    }
    Ok(fields)
}

/// A prepared statement's description (formats not known yet) with the
/// result formats its Bind asked for.
pub fn with_formats(desc: &[Field], formats: &[i16]) -> Vec<Field> {
    desc.iter()
        .enumerate()
        .map(|(i, f)| Field {
            name: f.name.clone(),
            type_oid: f.type_oid,
            format: format_of(formats, i),
        })
        .collect()
}

fn format_of(formats: &[i16], i: usize) -> i16 {
    match formats.len() {
        0 => 0,
        1 => formats[0],
        _ => formats.get(i).copied().unwrap_or(0),
    }
}

/// How a binary value of this type can be scanned: from which byte, or
/// not at all (`None`).
fn binary_text_offset(type_oid: u32) -> Option<usize> {
    match type_oid {
        // text, varchar, bpchar, name, json, xml, unknown, bytea, char
        25 | 1043 | 1042 | 19 | 114 | 142 | 705 | 17 | 18 => Some(0),
        // jsonb: a version byte, then the text
        3802 => Some(1),
        // Types that cannot carry a matched string (numbers, times,
        // booleans, uuids, network addresses).
        _ => None,
    }
}

/// Binary values of these types hold no text a pattern could match.
fn binary_without_text(type_oid: u32) -> bool {
    matches!(
        type_oid,
        16 | 20
            | 21
            | 23
            | 26
            | 700
            | 701
            | 1700
            | 1082
            | 1083
            | 1114
            | 1184
            | 1186
            | 1266
            | 2950
            | 869
            | 650
            | 829
            | 774
    )
}

enum Action {
    Keep,
    /// Replace these byte ranges with the mask byte.
    Spans(Vec<(usize, usize)>),
    Null,
}

/// Masks one DataRow; `None` when nothing changed. Without a description
/// (the client never asked for one) every value is masked (fail closed).
pub fn data_row(
    body: &[u8],
    desc: Option<&[Field]>,
    result_formats: &[i16],
    plan: &ResultMask,
    masked: &mut BTreeMap<String, u64>,
) -> Result<Option<Bytes>, PgError> {
    let mut rest = body;
    let n = codec::take_i16(&mut rest)?.max(0) as usize;
    let mut values: Vec<Option<&[u8]>> = Vec::with_capacity(n.min(1600));
    for _ in 0..n {
        let len = codec::take_i32(&mut rest)?;
        values.push(if len < 0 {
            None
        } else {
            Some(codec::take_bytes(&mut rest, len as usize)?)
        });
    }
    let first_rule = plan.rules.first().copied().unwrap_or_default();
    let mut actions = Vec::with_capacity(n);
    let mut changed = false;
    for (i, v) in values.iter().enumerate() {
        let Some(v) = v else {
            actions.push(Action::Keep);
            continue;
        };
        let (name, format, type_oid) = match desc.and_then(|d| d.get(i)) {
            Some(f) => (Some(f.name.as_str()), f.format, f.type_oid),
            None => (None, format_of(result_formats, i), 0),
        };
        let column_rule = match name {
            Some(n) => plan.column_rule(n),
            // Unknown column: treated as masked by the first rule.
            None => Some(first_rule),
        };
        let action = if let Some(rule) = column_rule {
            count(masked, plan.rule_id(rule));
            if format == 1 {
                Action::Null
            } else {
                Action::Spans(vec![(0, v.len())])
            }
        } else if plan.scans() {
            let from = if format == 1 {
                binary_text_offset(type_oid)
            } else {
                Some(0)
            };
            match from {
                Some(from) => {
                    let found = spans(v.get(from..).unwrap_or_default(), plan, masked)?;
                    if found.is_empty() {
                        Action::Keep
                    } else {
                        Action::Spans(
                            found
                                .into_iter()
                                .map(|(a, b)| (a + from, b + from))
                                .collect(),
                        )
                    }
                }
                None if binary_without_text(type_oid) => Action::Keep,
                None => {
                    count(
                        masked,
                        plan.rule_id(plan.scanning_rule().unwrap_or(first_rule)),
                    );
                    Action::Null
                }
            }
        } else {
            Action::Keep
        };
        changed |= !matches!(action, Action::Keep);
        actions.push(action);
    }
    if !changed {
        return Ok(None);
    }
    let mut out = BytesMut::with_capacity(body.len());
    out.put_i16(n as i16);
    for (v, a) in values.iter().zip(actions) {
        match (v, a) {
            (None, _) | (Some(_), Action::Null) => out.put_i32(-1),
            (Some(v), Action::Keep) => {
                out.put_i32(v.len() as i32);
                out.put_slice(v);
            }
            (Some(v), Action::Spans(spans)) => {
                out.put_i32(v.len() as i32);
                let start = out.len();
                out.put_slice(v);
                for (a, b) in spans {
                    out[start + a..start + b].fill(MASK);
                }
            }
        }
    }
    Ok(Some(out.freeze()))
}

/// Pattern matches of the applicable rules in one value.
pub(super) fn spans(
    v: &[u8],
    plan: &ResultMask,
    masked: &mut BTreeMap<String, u64>,
) -> Result<Vec<(usize, usize)>, PgError> {
    let hits = plan
        .scanner()
        .find(v)
        .map_err(|e| PgError::Protocol(format!("result scan failed: {e}")))?;
    let mut out = Vec::new();
    for h in hits {
        if plan.rules.contains(&h.rule) && h.mask_end <= v.len() && h.mask_start < h.mask_end {
            count(masked, plan.rule_id(h.rule));
            out.push((h.mask_start, h.mask_end));
        }
    }
    Ok(out)
}

fn count(masked: &mut BTreeMap<String, u64>, rule: &str) {
    *masked.entry(rule.to_owned()).or_default() += 1;
}

/// The values of a DataRow as text (the node's own probe's answer).
pub fn text_values(body: &[u8]) -> Option<Vec<Option<String>>> {
    let mut rest = body;
    let n = codec::take_i16(&mut rest).ok()?.max(0) as usize;
    let mut out = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        let len = codec::take_i32(&mut rest).ok()?;
        out.push(if len < 0 {
            None
        } else {
            let v = codec::take_bytes(&mut rest, len as usize).ok()?;
            Some(String::from_utf8_lossy(v).into_owned())
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{identity::WorkloadIdentity, policy::CompiledPolicy};

    fn plan() -> ResultMask {
        let p = CompiledPolicy::compile(
            "version: 1\nname: x\nrules:\n  - id: cols\n    on: result\n    columns: [\"*email*\"]\n    action: mask\n  - id: keys\n    on: result\n    packs: [secrets]\n    action: mask\n",
            "t",
            8192,
        )
        .unwrap();
        Arc::new(p)
            .result_mask("db", &WorkloadIdentity::default())
            .unwrap()
    }

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
            }
        }
        b.to_vec()
    }

    fn field(name: &str, type_oid: u32, format: i16) -> Field {
        Field {
            name: name.into(),
            type_oid,
            format,
        }
    }

    #[test]
    fn rows_are_masked_by_column_and_pattern_with_valid_lengths() {
        let plan = plan();
        let key = b"AKIAQ3EGRXZ7PLM4VB2K";
        let note = [&b"key "[..], key].concat();
        let desc = [
            field("name", 25, 0),
            field("user_email", 25, 0),
            field("note", 25, 0),
            field("n", 23, 1),
            field("blob", 2249, 1),
        ];
        let body = row(&[
            Some(b"ada"),
            Some(b"a@x.io"),
            Some(&note),
            Some(&[0, 0, 0, 7]),
            Some(b"??"),
        ]);
        let mut masked = BTreeMap::new();
        let out = data_row(&body, Some(&desc), &[], &plan, &mut masked)
            .unwrap()
            .unwrap();
        let want = row(&[
            Some(b"ada"),
            Some(b"******"),
            Some(b"key ********************"),
            Some(&[0, 0, 0, 7]),
            None,
        ]);
        assert_eq!(out.to_vec(), want);
        assert_eq!(masked.get("cols"), Some(&1));
        assert_eq!(masked.get("keys"), Some(&2));
        // Nothing to mask: the row goes as it came.
        let clean = row(&[Some(b"bob"), None]);
        assert!(data_row(&clean, Some(&desc), &[], &plan, &mut masked)
            .unwrap()
            .is_none());
        // No description: every value masked (fail closed).
        let out = data_row(&row(&[Some(b"bob")]), None, &[], &plan, &mut masked)
            .unwrap()
            .unwrap();
        assert_eq!(out.to_vec(), row(&[Some(b"***")]));
        // Lies about lengths are errors, not panics.
        for bad in [
            &[0u8, 1, 0, 0, 0, 9, b'x'][..],
            &[0, 2, 0, 0, 0, 1, b'x'],
            &[0xff],
        ] {
            assert!(data_row(bad, Some(&desc), &[], &plan, &mut masked).is_err());
        }
        assert!(row_description(&[0, 1, b'a']).is_err());
    }
}
