//! Scanning throughput: the full built-in rule packs (secrets + pii) over
//! ~100 MB of generated, realistic text (source code, JSON, logs, with a
//! few secrets sprinkled in), Hyperscan prefilter + regex spans (Sluice's
//! engine) against a `regex::bytes::RegexSet` baseline doing the same job
//! (which patterns match, then exact spans). One thread: MB/s per core.
//!
//! `cargo run --release -p node-agent --example scan_bench [MB]`
use std::time::Instant;

use node_agent::{
    policy::CompiledPolicy,
    scan::{PatternSpec, Scanner},
};

/// Deterministic generator (xorshift) so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[(self.next() % v.len() as u64) as usize]
    }
}

fn corpus(mb: usize) -> Vec<u8> {
    let mut r = Rng(0x9e3779b97f4a7c15);
    let idents = [
        "request",
        "handler",
        "config",
        "user_id",
        "payload",
        "retry",
        "buffer",
        "session",
        "token_count",
        "stream",
    ];
    let words = [
        "the", "build", "failed", "because", "cache", "was", "cold", "and", "network", "timeout",
        "after", "retrying", "deploy", "step",
    ];
    let mut out = Vec::with_capacity(mb << 20);
    let mut n = 0u64;
    while out.len() < mb << 20 {
        n += 1;
        match r.next() % 3 {
            0 => {
                let (a, b) = (r.pick(&idents), r.pick(&idents));
                out.extend_from_slice(
                    format!(
                        "fn {a}_{n}(ctx: &Context, {b}: usize) -> Result<(), Error> {{\n    let {a} = ctx.{b}.get({n}).ok_or(Error::Missing)?;\n    tracing::debug!({a} = ?{a}, \"handled\");\n    Ok(())\n}}\n\n"
                    )
                    .as_bytes(),
                );
            }
            1 => {
                let w: Vec<&str> = (0..8).map(|_| r.pick(&words)).collect();
                out.extend_from_slice(
                    format!(
                        "{{\"id\":{n},\"event\":\"{}\",\"message\":\"{}\",\"latency_ms\":{},\"ok\":{}}}\n",
                        r.pick(&idents),
                        w.join(" "),
                        r.next() % 5000,
                        r.next().is_multiple_of(2)
                    )
                    .as_bytes(),
                );
            }
            _ => {
                let w: Vec<&str> = (0..12).map(|_| r.pick(&words)).collect();
                out.extend_from_slice(
                    format!(
                        "2026-11-21T23:{:02}:{:02}Z INFO job={} step={} {}\n",
                        n % 60,
                        (n / 60) % 60,
                        r.next() % 100000,
                        r.pick(&idents),
                        w.join(" ")
                    )
                    .as_bytes(),
                );
            }
        }
        if n.is_multiple_of(5000) {
            // A secret every few hundred KB, as in real traffic.
            out.extend_from_slice(b"aws_key=AKIAIOSFODNN7EXAMPLE token=ghp_abcdefghijklmnopqrstuvwxyz0123456789 card 4111 1111 1111 1111 mail dev@example.com\n");
        }
    }
    out
}

fn main() {
    let mb: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100);
    // The full packs, through the real bundle compiler.
    let bundle = "version: 1\nname: bench\nrules:\n  - id: all\n    on: response\n    packs: [secrets, pii]\n    action: mask\n";
    let policy = CompiledPolicy::compile(bundle, "bench", 8192).expect("packs compile");
    let scanner: &Scanner = policy.as_ref();
    let specs: Vec<PatternSpec> = (0..scanner.len())
        .map(|i| scanner.pattern(i).clone())
        .collect();
    let set = regex::bytes::RegexSetBuilder::new(specs.iter().map(|s| s.regex.as_str()))
        .unicode(false)
        .size_limit(1 << 28)
        .dfa_size_limit(1 << 28)
        .build()
        .expect("regex set");
    let singles: Vec<regex::bytes::Regex> = specs
        .iter()
        .map(|s| {
            regex::bytes::RegexBuilder::new(&s.regex)
                .unicode(false)
                .build()
                .unwrap()
        })
        .collect();

    let data = corpus(mb);
    let chunk = 64 * 1024;
    println!(
        "corpus: {:.1} MB, {} patterns, {} KiB chunks",
        data.len() as f64 / 1e6,
        specs.len(),
        chunk / 1024
    );

    if std::env::var_os("PER_PATTERN").is_some() {
        for sp in &specs {
            let one = Scanner::compile(vec![sp.clone()], 8192).unwrap();
            let t = Instant::now();
            for c in data[..20 << 20].chunks(chunk) {
                one.find(c).unwrap();
            }
            println!(
                "{:<28} {:>8.1} MB/s",
                sp.id,
                20.0 * 1.048576 / t.elapsed().as_secs_f64()
            );
        }
    }
    let mut best = [f64::MAX, f64::MAX];
    let mut hits = [0usize, 0usize];
    for _round in 0..3 {
        let t = Instant::now();
        let mut h = 0;
        for c in data.chunks(chunk) {
            h += scanner.find(c).expect("scan").len();
        }
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        hits[0] = h;

        let t = Instant::now();
        let mut h = 0;
        for c in data.chunks(chunk) {
            for i in set.matches(c).iter() {
                h += singles[i]
                    .find_iter(c)
                    .filter(|m| !specs[i].luhn || node_agent::scan::luhn(m.as_bytes()))
                    .count();
            }
        }
        best[1] = best[1].min(t.elapsed().as_secs_f64());
        hits[1] = h;
    }
    let mbs = |s: f64| data.len() as f64 / 1e6 / s;
    println!("{:<28} {:>10} {:>8}", "engine (1 core)", "MB/s", "hits");
    println!(
        "{:<28} {:>10.1} {:>8}",
        "hyperscan + regex spans",
        mbs(best[0]),
        hits[0]
    );
    println!(
        "{:<28} {:>10.1} {:>8}",
        "regex RegexSet + spans",
        mbs(best[1]),
        hits[1]
    );
    println!("ratio hyperscan / RegexSet: {:.2}x", best[1] / best[0]);
    assert_eq!(hits[0], hits[1], "both engines must find the same matches");
}
