//! Response stage: how a response is read for masking (its framing from
//! the content type, its Content-Encoding), and the header changes that
//! follow (a decoded body goes on as identity, a length that may change
//! is dropped).
use hyper::header::{HeaderMap, HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};

use super::decode::{DecodeError, Decoder, Encoding};
use crate::scan::{
    envelope::{Codec, Payload},
    Framing, ScanError, StreamMasker,
};

#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Scan(#[from] ScanError),
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Framing of a response body from its content type (gRPC, Connect
/// streams, SSE; everything else is scanned as raw bytes).
pub fn framing(h: &HeaderMap) -> Result<Framing, ResponseError> {
    let ct = header(h, CONTENT_TYPE.as_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence == "text/event-stream" {
        return Ok(Framing::Sse);
    }
    if matches!(
        essence,
        "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/jsonlines"
    ) {
        return Ok(Framing::Ndjson);
    }
    let (payload, codec_header) = match essence {
        "application/grpc"
        | "application/grpc+proto"
        | "application/grpc-web"
        | "application/grpc-web+proto" => (Payload::Proto, "grpc-encoding"),
        "application/grpc+json" | "application/grpc-web+json" => (Payload::Json, "grpc-encoding"),
        "application/connect+proto" => (Payload::Proto, "connect-content-encoding"),
        "application/connect+json" => (Payload::Json, "connect-content-encoding"),
        "application/json" | "text/json" => return Ok(Framing::Json),
        e if e.ends_with("+json") => return Ok(Framing::Json),
        _ => return Ok(Framing::Raw),
    };
    let codec = Codec::from_header(header(h, codec_header))?;
    Ok(Framing::Envelope { payload, codec })
}

/// Prepares a response for masking: returns its framing and a decoder if
/// the upstream compressed it (although the node asked for identity), and
/// fixes the headers the client will see.
pub fn prepare(h: &mut HeaderMap) -> Result<(Framing, Option<Decoder>), ResponseError> {
    let framing = framing(h)?;
    // Every Content-Encoding header counts (a first `identity` must not
    // hide a second `gzip`).
    let codings = Encoding::parse_all(h.get_all(CONTENT_ENCODING).iter().map(|v| v.as_bytes()))?;
    let decoder = if codings.is_empty() {
        None
    } else {
        Some(Decoder::new(&codings)?)
    };
    if decoder.is_some() {
        h.remove(CONTENT_ENCODING);
        h.remove(CONTENT_LENGTH);
    }
    if framing != Framing::Raw {
        // Masks written into escapes or re-compressed messages change size.
        h.remove(CONTENT_LENGTH);
    }
    Ok((framing, decoder))
}

/// Masks response header (or trailer) values by the response rules:
/// `grpc-message`, error detail headers and the like reach the client
/// as much as the body does.
pub fn mask_headers(h: &mut HeaderMap, masker: &mut StreamMasker) -> Result<(), ScanError> {
    let mut values: Vec<Vec<u8>> = h.values().map(|v| v.as_bytes().to_vec()).collect();
    if !masker.mask_values(&mut values)? {
        return Ok(());
    }
    for (v, new) in h.values_mut().zip(values) {
        if v.as_bytes() != new.as_slice() {
            // `*` for bytes of a valid value is still a valid value.
            if let Ok(m) = HeaderValue::from_bytes(&new) {
                *v = m;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn framings_and_header_fixes() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("10"));
        let (f, d) = prepare(&mut h).unwrap();
        assert_eq!(f, Framing::Sse);
        assert!(d.is_none() && h.get(CONTENT_LENGTH).is_none());

        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-encoding", HeaderValue::from_static("gzip"));
        assert_eq!(
            framing(&h).unwrap(),
            Framing::Envelope {
                payload: Payload::Proto,
                codec: Codec::Gzip
            }
        );
        h.insert("grpc-encoding", HeaderValue::from_static("snappy"));
        assert!(framing(&h).is_err());

        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("99"));
        let (f, d) = prepare(&mut h).unwrap();
        assert_eq!(f, Framing::Json);
        assert!(d.is_some());
        assert!(h.get(CONTENT_ENCODING).is_none() && h.get(CONTENT_LENGTH).is_none());

        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("99"));
        let (f, d) = prepare(&mut h).unwrap();
        assert_eq!(f, Framing::Raw);
        assert!(
            d.is_none() && h.get(CONTENT_LENGTH).is_some(),
            "raw keeps its length"
        );
    }
}
