//! Content-Encoding: what is scanned is what the far end will read. A
//! compressed response is decoded as it streams (and sent on as identity);
//! a compressed request body is decoded before request rules judge it.
use std::io::{Read, Write};

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("content encoding `{0}` cannot be inspected")]
    Unsupported(String),
    #[error("{encoding} body does not decode: {message}")]
    Corrupt {
        encoding: &'static str,
        message: String,
    },
    #[error("decoded body larger than {0} bytes")]
    TooLarge(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Encoding {
    /// `Content-Encoding` value(s); `None` for identity. Stacked encodings
    /// (`gzip, br`) are refused rather than half-decoded.
    pub fn parse(value: Option<&str>) -> Result<Option<Self>, DecodeError> {
        let Some(v) = value else {
            return Ok(None);
        };
        let parts: Vec<&str> = v
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && !p.eq_ignore_ascii_case("identity"))
            .collect();
        match parts.as_slice() {
            [] => Ok(None),
            [one] => match one.to_ascii_lowercase().as_str() {
                "gzip" | "x-gzip" => Ok(Some(Self::Gzip)),
                "deflate" => Ok(Some(Self::Deflate)),
                "br" => Ok(Some(Self::Brotli)),
                "zstd" => Ok(Some(Self::Zstd)),
                other => Err(DecodeError::Unsupported(other.to_owned())),
            },
            _ => Err(DecodeError::Unsupported(v.to_owned())),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
            Self::Brotli => "br",
            Self::Zstd => "zstd",
        }
    }

    /// Decodes a whole body, refusing more than `limit` decoded bytes (a
    /// small compressed body can expand without bound).
    pub fn decode_all(self, data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
        let corrupt = |e: std::io::Error| DecodeError::Corrupt {
            encoding: self.name(),
            message: e.to_string(),
        };
        let reader: Box<dyn Read + '_> = match self {
            Self::Gzip => Box::new(flate2::read::MultiGzDecoder::new(data)),
            Self::Deflate => Box::new(flate2::read::ZlibDecoder::new(data)),
            Self::Brotli => Box::new(brotli_decompressor::Decompressor::new(data, 8192)),
            Self::Zstd => Box::new(zstd::stream::read::Decoder::new(data).map_err(corrupt)?),
        };
        let mut out = Vec::new();
        reader
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(corrupt)?;
        if out.len() > limit {
            return Err(DecodeError::TooLarge(limit));
        }
        Ok(out)
    }
}

/// A streaming decoder: compressed chunks in, decoded bytes out.
pub struct Decoder {
    encoding: Encoding,
    inner: Inner,
}

enum Inner {
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

impl Decoder {
    pub fn new(encoding: Encoding) -> Result<Self, DecodeError> {
        let inner = match encoding {
            Encoding::Gzip => Inner::Gzip(flate2::write::MultiGzDecoder::new(Vec::new())),
            Encoding::Deflate => Inner::Deflate(flate2::write::ZlibDecoder::new(Vec::new())),
            Encoding::Brotli => Inner::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(Vec::new(), 8192),
            )),
            Encoding::Zstd => {
                Inner::Zstd(zstd::stream::write::Decoder::new(Vec::new()).map_err(|e| {
                    DecodeError::Corrupt {
                        encoding: "zstd",
                        message: e.to_string(),
                    }
                })?)
            }
        };
        Ok(Self { encoding, inner })
    }

    fn corrupt(&self, e: std::io::Error) -> DecodeError {
        DecodeError::Corrupt {
            encoding: self.encoding.name(),
            message: e.to_string(),
        }
    }

    /// Feeds compressed bytes; returns what decoded so far.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let r = match &mut self.inner {
            Inner::Gzip(d) => d
                .write_all(data)
                .and_then(|_| d.flush())
                .map(|_| std::mem::take(d.get_mut())),
            Inner::Deflate(d) => d
                .write_all(data)
                .and_then(|_| d.flush())
                .map(|_| std::mem::take(d.get_mut())),
            Inner::Brotli(d) => d
                .write_all(data)
                .and_then(|_| d.flush())
                .map(|_| std::mem::take(d.get_mut())),
            Inner::Zstd(d) => d
                .write_all(data)
                .and_then(|_| d.flush())
                .map(|_| std::mem::take(d.get_mut())),
        };
        r.map_err(|e| self.corrupt(e))
    }

    /// End of the compressed stream: the rest, or an error if it was cut.
    pub fn finish(&mut self) -> Result<Vec<u8>, DecodeError> {
        let encoding = self.encoding;
        let inner = std::mem::replace(
            &mut self.inner,
            Inner::Gzip(flate2::write::MultiGzDecoder::new(Vec::new())),
        );
        let r = match inner {
            Inner::Gzip(d) => d.finish(),
            Inner::Deflate(d) => d.finish(),
            Inner::Brotli(d) => (*d)
                .into_inner()
                .map_err(|_| std::io::Error::other("truncated brotli stream")),
            Inner::Zstd(mut d) => d.flush().map(|_| d.into_inner()),
        };
        r.map_err(|e| DecodeError::Corrupt {
            encoding: encoding.name(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn streaming_gzip_in_small_chunks() {
        let plain = b"secret AKIAIOSFODNN7EXAMPLE and more text".repeat(50);
        let z = gzip(&plain);
        let mut d = Decoder::new(Encoding::Gzip).unwrap();
        let mut out = Vec::new();
        for c in z.chunks(7) {
            out.extend(d.push(c).unwrap());
        }
        out.extend(d.finish().unwrap());
        assert_eq!(out, plain);
    }

    #[test]
    fn zstd_and_limits_and_bad_input() {
        let plain = vec![b'a'; 100_000];
        let z = zstd::encode_all(&plain[..], 3).unwrap();
        assert_eq!(Encoding::Zstd.decode_all(&z, 200_000).unwrap(), plain);
        assert!(matches!(
            Encoding::Zstd.decode_all(&z, 1000),
            Err(DecodeError::TooLarge(1000))
        ));
        let mut d = Decoder::new(Encoding::Gzip).unwrap();
        assert!(d.push(b"definitely not gzip").is_err());
        assert!(Encoding::parse(Some("gzip, br")).is_err());
        assert!(Encoding::parse(Some("compress")).is_err());
        assert_eq!(Encoding::parse(Some("identity")).unwrap(), None);
    }
}
