//! Sample templates of the secrets pack (policies/packs/samples/secrets.yaml),
//! expanded with a seeded RNG: shared by the pack test and the end-to-end
//! test that sends every sample through the proxy.
#![allow(dead_code)]

use std::collections::BTreeMap;

pub const SAMPLES: &str = include_str!("../../../policies/packs/samples/secrets.yaml");

/// xorshift64*: deterministic, so a failure reproduces.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: &str) -> Self {
        // FNV-1a of the seed text.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        Rng(h | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    pub fn pick(&mut self, alphabet: &[u8]) -> char {
        alphabet[(self.next() % alphabet.len() as u64) as usize] as char
    }
}

pub const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn class(name: &str) -> Option<&'static [u8]> {
    Some(match name {
        "alnum" => b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
        "upper" => b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "lower" => b"abcdefghijklmnopqrstuvwxyz",
        "digit" => b"0123456789",
        "hex" => b"0123456789abcdef",
        "HEX" => b"0123456789ABCDEF",
        "b64" => B64,
        "b64url" => b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        "b32" => b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567",
        "lb32" => b"abcdefghijklmnopqrstuvwxyz234567",
        "ualnum" => b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        "lalnum" => b"abcdefghijklmnopqrstuvwxyz0123456789",
        "age" => b"QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L",
        _ => return None,
    })
}

pub fn base64(data: &[u8]) -> String {
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Random base64 lines of 64 characters, each ending in `nl`.
pub fn b64_lines(rng: &mut Rng, lines: usize, nl: &str) -> String {
    let mut s = String::new();
    for _ in 0..lines {
        for _ in 0..64 {
            s.push(rng.pick(B64));
        }
        s.push_str(nl);
    }
    s
}

/// A PEM block with a random body (not a key: random bytes); the body is
/// marked as the secret.
pub fn pem(rng: &mut Rng, label: &str, nl: &str, mark: bool) -> String {
    let (open, close) = if mark { ("«", "»") } else { ("", "") };
    let mut body = b64_lines(rng, 20, nl);
    for _ in 0..40 {
        body.push(rng.pick(B64));
    }
    body.push_str("==");
    body.push_str(nl);
    format!("-----BEGIN {label}-----{nl}{open}{body}{close}-----END {label}-----")
}

/// Expands a sample template; returns the text and the secret's byte span.
pub fn expand(template: &str, rng: &mut Rng) -> (String, std::ops::Range<usize>) {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        // `{class:N}` or `{special:ARG}`; any other brace is literal.
        let placeholder = tail.find('}').and_then(|end| {
            let (name, arg) = tail[1..end].split_once(':')?;
            (class(name).is_some() || ["pem", "pemjson", "pemb64", "b64lines"].contains(&name))
                .then_some((name, arg, end))
        });
        let Some((name, arg, end)) = placeholder else {
            out.push('{');
            rest = &tail[1..];
            continue;
        };
        match name {
            "pem" => out.push_str(&pem(rng, arg, "\n", true)),
            "pemjson" => out.push_str(&pem(rng, arg, "\\n", true)),
            "pemb64" => out.push_str(&base64(pem(rng, arg, "\n", false).as_bytes())),
            "b64lines" => out.push_str(&b64_lines(rng, arg.parse().unwrap(), "\n")),
            _ => {
                let n: usize = arg
                    .parse()
                    .unwrap_or_else(|_| panic!("bad count in `{template}`"));
                for _ in 0..n {
                    out.push(rng.pick(class(name).unwrap()));
                }
            }
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    match (out.find('«'), out.find('»')) {
        (Some(a), Some(b)) => {
            let text = out.replace(['«', '»'], "");
            (text, a..b - '«'.len_utf8())
        }
        (None, None) => {
            let n = out.len();
            (out, 0..n)
        }
        _ => panic!("unbalanced «» in sample `{template}`"),
    }
}

pub struct Samples {
    pub positive: Vec<String>,
    pub negative: Vec<String>,
    pub also: Vec<String>,
}

/// The `secrets` pack's samples.
pub fn samples() -> BTreeMap<String, Samples> {
    samples_of(SAMPLES)
}

pub fn samples_of(text: &str) -> BTreeMap<String, Samples> {
    let v: serde_yaml::Value = serde_yaml::from_str(text).expect("samples parse");
    let strings = |m: &serde_yaml::Value, k: &str| -> Vec<String> {
        m.get(k)
            .and_then(|x| x.as_sequence())
            .map(|s| {
                s.iter()
                    .map(|x| x.as_str().expect("samples are strings").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    v.as_mapping()
        .expect("samples: a mapping of id to samples")
        .iter()
        .map(|(k, m)| {
            let id = k.as_str().unwrap().to_owned();
            for key in m.as_mapping().unwrap().keys() {
                let key = key.as_str().unwrap();
                assert!(
                    ["positive", "negative", "also"].contains(&key),
                    "{id}: unknown key `{key}`"
                );
            }
            (
                id,
                Samples {
                    positive: strings(m, "positive"),
                    negative: strings(m, "negative"),
                    also: strings(m, "also"),
                },
            )
        })
        .collect()
}
