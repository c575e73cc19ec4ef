//! Content-Encoding: what is scanned is what the far end will read. A
//! compressed response is decoded as it streams (and sent on as identity);
//! a compressed request body is decoded before request rules judge it.
//! Every coding listed is undone, last applied first (`Content-Encoding:
//! gzip, br` is br over gzip), whatever headers the value is split over.
//!
//! Decoding is bounded: a small compressed body can expand without limit
//! (a zstd or brotli bomb stored by a job and served back by an upstream),
//! so what one chunk may produce and what a body may produce against its
//! compressed size are capped; over the bound the body fails visibly.
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
    #[error("{encoding} body expands beyond the decoding bound ({bound}); refused as a decompression bomb")]
    Bomb {
        encoding: &'static str,
        bound: Bound,
    },
}

/// Which decoding bound a body crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// More than `MAX_CHUNK_OUTPUT` from one chunk.
    Chunk,
    /// More than `MAX_RATIO` times the compressed bytes (past `RATIO_FLOOR`).
    Ratio,
    /// More than `MAX_BODY_OUTPUT` in all.
    Body,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Chunk => write!(f, "{MAX_CHUNK_OUTPUT} bytes from one chunk"),
            Self::Ratio => write!(
                f,
                "{MAX_RATIO}x the compressed size past the first {RATIO_FLOOR} bytes"
            ),
            Self::Body => write!(f, "{MAX_BODY_OUTPUT} bytes in all"),
        }
    }
}

/// Most decoded bytes one compressed chunk may produce (memory per push).
pub const MAX_CHUNK_OUTPUT: usize = 32 << 20;
/// Decoded bytes a body may reach whatever its compression ratio.
pub const RATIO_FLOOR: u64 = 16 << 20;
/// Past the floor, decoded / compressed may not exceed this. gzip and
/// deflate top out near 1032:1 on the most repetitive input, so no gzip
/// body trips it; zstd and brotli bombs run at 10^4 to 10^6:1.
pub const MAX_RATIO: u64 = 2048;
/// Most decoded bytes of one body.
pub const MAX_BODY_OUTPUT: u64 = 4 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Encoding {
    /// `Content-Encoding` values, in header order: the codings in the order
    /// they were applied (identity left out). An unknown coding anywhere is
    /// refused rather than half-decoded.
    pub fn parse_all<'a>(
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<Self>, DecodeError> {
        let mut out = Vec::new();
        for v in values {
            let v = std::str::from_utf8(v)
                .map_err(|_| DecodeError::Unsupported(String::from_utf8_lossy(v).into_owned()))?;
            for part in v.split(',').map(str::trim) {
                if part.is_empty() || part.eq_ignore_ascii_case("identity") {
                    continue;
                }
                out.push(match part.to_ascii_lowercase().as_str() {
                    "gzip" | "x-gzip" => Self::Gzip,
                    "deflate" => Self::Deflate,
                    "br" => Self::Brotli,
                    "zstd" => Self::Zstd,
                    other => return Err(DecodeError::Unsupported(other.to_owned())),
                });
            }
        }
        Ok(out)
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

/// Undoes every coding of a whole body (`codings` in the order applied),
/// each stage bounded by `limit` decoded bytes.
pub fn decode_chain(
    codings: &[Encoding],
    data: &[u8],
    limit: usize,
) -> Result<Vec<u8>, DecodeError> {
    let mut cur = std::borrow::Cow::Borrowed(data);
    for e in codings.iter().rev() {
        cur = std::borrow::Cow::Owned(e.decode_all(&cur, limit)?);
    }
    Ok(cur.into_owned())
}

/// Where a stage writes: refuses to grow past `limit`, so a bomb costs at
/// most the bound in memory, never what it would expand to.
struct Sink {
    buf: Vec<u8>,
    limit: usize,
    over: bool,
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            self.over = true;
            return Err(std::io::Error::other("decoding bound reached"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Inner {
    Gzip(flate2::write::MultiGzDecoder<Sink>),
    Deflate(flate2::write::ZlibDecoder<Sink>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Sink>>),
    Zstd(zstd::stream::write::Decoder<'static, Sink>),
    Done,
}

impl Inner {
    fn sink(&mut self) -> Option<&mut Sink> {
        match self {
            Self::Gzip(d) => Some(d.get_mut()),
            Self::Deflate(d) => Some(d.get_mut()),
            Self::Brotli(d) => Some(d.get_mut()),
            Self::Zstd(d) => Some(d.get_mut()),
            Self::Done => None,
        }
    }
}

/// One coding's streaming decoder.
struct Stage {
    encoding: Encoding,
    inner: Inner,
    produced: u64,
}

impl Stage {
    fn new(encoding: Encoding) -> Result<Self, DecodeError> {
        let sink = Sink {
            buf: Vec::new(),
            limit: 0,
            over: false,
        };
        let inner = match encoding {
            Encoding::Gzip => Inner::Gzip(flate2::write::MultiGzDecoder::new(sink)),
            Encoding::Deflate => Inner::Deflate(flate2::write::ZlibDecoder::new(sink)),
            Encoding::Brotli => Inner::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(sink, 8192),
            )),
            Encoding::Zstd => {
                Inner::Zstd(zstd::stream::write::Decoder::new(sink).map_err(|e| {
                    DecodeError::Corrupt {
                        encoding: "zstd",
                        message: e.to_string(),
                    }
                })?)
            }
        };
        Ok(Self {
            encoding,
            inner,
            produced: 0,
        })
    }

    /// How much this stage may still produce, and which bound that is.
    fn allowance(&self, compressed_in: u64) -> (usize, Bound) {
        let ratio = RATIO_FLOOR.max(compressed_in.saturating_mul(MAX_RATIO));
        let (total, bound) = if ratio < MAX_BODY_OUTPUT {
            (ratio, Bound::Ratio)
        } else {
            (MAX_BODY_OUTPUT, Bound::Body)
        };
        let left = total.saturating_sub(self.produced);
        if left >= MAX_CHUNK_OUTPUT as u64 {
            (MAX_CHUNK_OUTPUT, Bound::Chunk)
        } else {
            (left as usize, bound)
        }
    }

    fn run(
        &mut self,
        compressed_in: u64,
        f: impl FnOnce(&mut Inner) -> std::io::Result<()>,
    ) -> Result<Vec<u8>, DecodeError> {
        let (limit, bound) = self.allowance(compressed_in);
        if let Some(s) = self.inner.sink() {
            s.limit = limit;
        }
        let r = f(&mut self.inner);
        let Some(sink) = self.inner.sink() else {
            return r.map(|_| Vec::new()).map_err(|e| self.corrupt(e));
        };
        if sink.over {
            return Err(DecodeError::Bomb {
                encoding: self.encoding.name(),
                bound,
            });
        }
        let out = std::mem::take(&mut sink.buf);
        r.map_err(|e| self.corrupt(e))?;
        self.produced += out.len() as u64;
        Ok(out)
    }

    fn push(&mut self, data: &[u8], compressed_in: u64) -> Result<Vec<u8>, DecodeError> {
        self.run(compressed_in, |inner| match inner {
            Inner::Gzip(d) => d.write_all(data).and_then(|_| d.flush()),
            Inner::Deflate(d) => d.write_all(data).and_then(|_| d.flush()),
            Inner::Brotli(d) => d.write_all(data).and_then(|_| d.flush()),
            Inner::Zstd(d) => d.write_all(data).and_then(|_| d.flush()),
            Inner::Done => Err(std::io::Error::other("data after the end of the stream")),
        })
    }

    fn finish(&mut self, compressed_in: u64) -> Result<Vec<u8>, DecodeError> {
        let (limit, bound) = self.allowance(compressed_in);
        let inner = std::mem::replace(&mut self.inner, Inner::Done);
        let r = match inner {
            Inner::Gzip(mut d) => {
                d.get_mut().limit = limit;
                d.finish()
            }
            Inner::Deflate(mut d) => {
                d.get_mut().limit = limit;
                d.finish()
            }
            Inner::Brotli(mut d) => {
                d.get_mut().limit = limit;
                (*d).into_inner()
                    .map_err(|_| std::io::Error::other("truncated brotli stream"))
            }
            Inner::Zstd(mut d) => {
                d.get_mut().limit = limit;
                d.flush().map(|_| d.into_inner())
            }
            Inner::Done => return Ok(Vec::new()),
        };
        match r {
            Ok(sink) if sink.over => Err(DecodeError::Bomb {
                encoding: self.encoding.name(),
                bound,
            }),
            Ok(sink) => Ok(sink.buf),
            Err(e) => Err(self.corrupt(e)),
        }
    }

    fn corrupt(&self, e: std::io::Error) -> DecodeError {
        DecodeError::Corrupt {
            encoding: self.encoding.name(),
            message: e.to_string(),
        }
    }
}

/// A streaming decoder for a body's codings: compressed chunks in,
/// decoded bytes out, each stage bounded against the compressed size.
pub struct Decoder {
    /// Last applied first: `stages[0]` reads the wire bytes.
    stages: Vec<Stage>,
    compressed_in: u64,
}

impl Decoder {
    /// `codings` in the order they were applied (header order).
    pub fn new(codings: &[Encoding]) -> Result<Self, DecodeError> {
        let stages = codings
            .iter()
            .rev()
            .map(|e| Stage::new(*e))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            stages,
            compressed_in: 0,
        })
    }

    /// Feeds compressed bytes; returns what decoded so far.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<u8>, DecodeError> {
        self.compressed_in += data.len() as u64;
        let n = self.compressed_in;
        let mut stages = self.stages.iter_mut();
        let Some(first) = stages.next() else {
            return Ok(data.to_vec());
        };
        let mut cur = first.push(data, n)?;
        for s in stages {
            cur = s.push(&cur, n)?;
        }
        Ok(cur)
    }

    /// End of the compressed stream: the rest, or an error if it was cut.
    pub fn finish(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.compressed_in;
        let mut carry: Vec<u8> = Vec::new();
        for s in &mut self.stages {
            let mut out = if carry.is_empty() {
                Vec::new()
            } else {
                s.push(&carry, n)?
            };
            out.extend(s.finish(n)?);
            carry = out;
        }
        Ok(carry)
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
        let mut d = Decoder::new(&[Encoding::Gzip]).unwrap();
        let mut out = Vec::new();
        for c in z.chunks(7) {
            out.extend(d.push(c).unwrap());
        }
        out.extend(d.finish().unwrap());
        assert_eq!(out, plain);
    }

    #[test]
    fn stacked_codings_are_undone_last_first() {
        let plain = b"AKIAIOSFODNN7EXAMPLE ".repeat(100);
        let z = zstd::encode_all(&gzip(&plain)[..], 3).unwrap();
        let codings =
            Encoding::parse_all([b"identity".as_slice(), b"gzip, zstd".as_slice()]).unwrap();
        assert_eq!(codings, vec![Encoding::Gzip, Encoding::Zstd]);
        let mut d = Decoder::new(&codings).unwrap();
        let mut out = Vec::new();
        for c in z.chunks(5) {
            out.extend(d.push(c).unwrap());
        }
        out.extend(d.finish().unwrap());
        assert_eq!(out, plain);
        assert_eq!(decode_chain(&codings, &z, 1 << 20).unwrap(), plain);
    }

    #[test]
    fn a_bomb_fails_at_the_bound_not_at_its_size() {
        // 512 MiB of zeros, a few KiB compressed.
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..512 {
            e.write_all(&zeros).unwrap();
        }
        let z = e.finish().unwrap();
        assert!(z.len() < 64 << 10, "{}", z.len());
        let mut d = Decoder::new(&[Encoding::Zstd]).unwrap();
        let mut total = 0usize;
        let mut err = None;
        for c in z.chunks(16 << 10) {
            match d.push(c) {
                Ok(o) => total += o.len(),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let err = err
            .or_else(|| d.finish().err())
            .expect("the bomb is refused");
        assert!(
            matches!(
                err,
                DecodeError::Bomb {
                    bound: Bound::Ratio | Bound::Chunk,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            total as u64 <= RATIO_FLOOR + MAX_CHUNK_OUTPUT as u64,
            "{total}"
        );
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
        let mut d = Decoder::new(&[Encoding::Gzip]).unwrap();
        assert!(d.push(b"definitely not gzip").is_err());
        assert!(Encoding::parse_all([b"gzip, compress".as_slice()]).is_err());
        assert!(Encoding::parse_all([b"identity".as_slice()])
            .unwrap()
            .is_empty());
    }
}
