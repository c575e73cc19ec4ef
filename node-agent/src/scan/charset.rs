//! JSON text in the encodings JSON readers accept: RFC 8259 says UTF-8,
//! but Python's `json` (so FastAPI-style upstreams) also reads a UTF-8
//! BOM, UTF-16 and UTF-32, detected from a BOM or from where the first
//! bytes are zero. A body the upstream reads as text must be judged as
//! that text, never as its raw bytes.
use std::borrow::Cow;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("body marked as {encoding} does not decode: {what}")]
pub struct CharsetError {
    pub encoding: &'static str,
    pub what: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Utf {
    U8Bom,
    U16 { be: bool, bom: bool },
    U32 { be: bool, bom: bool },
}

/// Python's `json.detect_encoding`, plus whether a BOM said so.
fn detect(b: &[u8]) -> Option<Utf> {
    let starts = |p: &[u8]| b.starts_with(p);
    if starts(&[0, 0, 0xFE, 0xFF]) {
        return Some(Utf::U32 {
            be: true,
            bom: true,
        });
    }
    if starts(&[0xFF, 0xFE, 0, 0]) {
        return Some(Utf::U32 {
            be: false,
            bom: true,
        });
    }
    if starts(&[0xFE, 0xFF]) {
        return Some(Utf::U16 {
            be: true,
            bom: true,
        });
    }
    if starts(&[0xFF, 0xFE]) {
        return Some(Utf::U16 {
            be: false,
            bom: true,
        });
    }
    if starts(&[0xEF, 0xBB, 0xBF]) {
        return Some(Utf::U8Bom);
    }
    if b.len() >= 4 {
        if b[0] == 0 {
            return Some(if b[1] != 0 {
                Utf::U16 {
                    be: true,
                    bom: false,
                }
            } else {
                Utf::U32 {
                    be: true,
                    bom: false,
                }
            });
        }
        if b[1] == 0 {
            return Some(if b[2] != 0 || b[3] != 0 {
                Utf::U16 {
                    be: false,
                    bom: false,
                }
            } else {
                Utf::U32 {
                    be: false,
                    bom: false,
                }
            });
        }
    } else if b.len() == 2 {
        if b[0] == 0 {
            return Some(Utf::U16 {
                be: true,
                bom: false,
            });
        }
        if b[1] == 0 {
            return Some(Utf::U16 {
                be: false,
                bom: false,
            });
        }
    }
    None
}

fn utf16(b: &[u8], be: bool) -> Result<String, &'static str> {
    if !b.len().is_multiple_of(2) {
        return Err("odd number of bytes");
    }
    let units = b.chunks_exact(2).map(|c| {
        if be {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_le_bytes([c[0], c[1]])
        }
    });
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .map_err(|_| "unpaired surrogate")
}

fn utf32(b: &[u8], be: bool) -> Result<String, &'static str> {
    if !b.len().is_multiple_of(4) {
        return Err("length not a multiple of 4");
    }
    b.chunks_exact(4)
        .map(|c| {
            let v = if be {
                u32::from_be_bytes([c[0], c[1], c[2], c[3]])
            } else {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            };
            char::from_u32(v).ok_or("not a Unicode scalar value")
        })
        .collect()
}

/// The body as UTF-8 JSON text where a JSON reader would read it so:
/// unchanged when it is plain UTF-8 (or binary), BOM stripped, UTF-16/32
/// decoded. A body that a BOM marks as UTF-16/32 but does not decode is
/// an error (fail closed); without a BOM, bytes that do not decode, or do
/// not read as JSON once decoded, are not text at all and stay as they are
/// (a gRPC message also starts with a zero byte).
pub fn json_text(b: &[u8]) -> Result<Cow<'_, [u8]>, CharsetError> {
    let Some(utf) = detect(b) else {
        return Ok(Cow::Borrowed(b));
    };
    let (name, bom, decoded) = match utf {
        Utf::U8Bom => return Ok(Cow::Borrowed(&b[3..])),
        Utf::U16 { be, bom } => {
            let body = if bom { &b[2..] } else { b };
            ("UTF-16", bom, utf16(body, be))
        }
        Utf::U32 { be, bom } => {
            let body = if bom { &b[4..] } else { b };
            ("UTF-32", bom, utf32(body, be))
        }
    };
    match decoded {
        Ok(s) if bom || super::json::strings(s.as_bytes()).is_ok() => {
            Ok(Cow::Owned(s.into_bytes()))
        }
        Ok(_) => Ok(Cow::Borrowed(b)),
        Err(what) if bom => Err(CharsetError {
            encoding: name,
            what,
        }),
        Err(_) => Ok(Cow::Borrowed(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc16(s: &str, be: bool, bom: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if bom {
            out.extend(if be { [0xFE, 0xFF] } else { [0xFF, 0xFE] });
        }
        for u in s.encode_utf16() {
            out.extend(if be { u.to_be_bytes() } else { u.to_le_bytes() });
        }
        out
    }

    #[test]
    fn boms_and_utf16_32_are_read_as_python_reads_them() {
        let doc = r#"{"prompt":"production\u0020password"}"#;
        let mut bom8 = vec![0xEF, 0xBB, 0xBF];
        bom8.extend_from_slice(doc.as_bytes());
        assert_eq!(json_text(&bom8).unwrap().as_ref(), doc.as_bytes());
        for be in [true, false] {
            for bom in [true, false] {
                let b = enc16(doc, be, bom);
                assert_eq!(
                    json_text(&b).unwrap().as_ref(),
                    doc.as_bytes(),
                    "{be} {bom}"
                );
            }
        }
        let mut b32 = vec![0xFF, 0xFE, 0, 0];
        for c in doc.chars() {
            b32.extend((c as u32).to_le_bytes());
        }
        assert_eq!(json_text(&b32).unwrap().as_ref(), doc.as_bytes());
        b32.drain(..4);
        assert_eq!(json_text(&b32).unwrap().as_ref(), doc.as_bytes());
    }

    #[test]
    fn binary_stays_and_broken_boms_fail() {
        // A gRPC envelope: zero flags byte, then a length.
        let grpc = [0u8, 0, 0, 0, 3, 0x0a, 1, b'x'];
        assert_eq!(json_text(&grpc).unwrap().as_ref(), &grpc);
        let plain = b"hello";
        assert_eq!(json_text(plain).unwrap().as_ref(), plain);
        assert!(json_text(&[0xFF, 0xFE, b'a']).is_err(), "odd UTF-16");
        assert!(json_text(&[0xFE, 0xFF, 0xD8, 0x00, 0x00, 0x41]).is_err());
    }
}
