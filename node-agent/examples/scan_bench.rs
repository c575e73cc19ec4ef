//! Scanning throughput: the full built-in rule packs (secrets + pii) over
//! ~100 MB of generated, realistic text (source code, JSON, logs, with a
//! few secrets sprinkled in), Hyperscan prefilter + regex spans (Sluice's
//! engine). One thread: MB/s per core.
//!
//! `cargo run --release -p node-agent --example scan_bench [MB]`
//!
//! `BASELINE=1`: also a `regex::bytes::RegexSet` doing the same job (which
//! patterns match, then exact spans; no post-filters), for comparison.
//! `PER_PATTERN=1`: each pattern alone. `PROFILE=1`: the Hyperscan pass
//! alone, and in how many chunks each pattern needed confirming.
//! `SKIP=id,id`: the packs without those patterns (what one costs, in the
//! same run as the whole, e.g. `SKIP=none` then `SKIP=generic-x`).
//! `ALT=file`: lines `id<TAB>prefilter` price other prefilters the same way.
//! `CORPUS=file`: scan that file instead of the generated text.

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

/// CPU time of this thread: on a shared machine wall time measures the
/// neighbours; MB/s per core is bytes over the CPU time spent scanning.
#[derive(Clone, Copy)]
struct Cpu(f64);
impl Cpu {
    fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we pass.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Cpu(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
    }
    fn elapsed(self) -> f64 {
        Cpu::now().0 - self.0
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
            // A secret every few hundred KB, as in real traffic (random,
            // generated here: nothing credential-shaped in the source).
            let mut key = String::from("AKIA");
            for _ in 0..16 {
                key.push(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[(r.next() % 32) as usize] as char);
            }
            out.extend_from_slice(format!("aws_key={key} token=ghp_abcdefghijklmnopqrstuvwxyz0123456789 card 4111 1111 1111 1111 mail dev@example.com\n").as_bytes());
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
    let skip = std::env::var("SKIP").unwrap_or_default();
    let skip: Vec<&str> = skip.split(',').collect();
    // `ALT=file`: lines `id<TAB>prefilter` replace those patterns'
    // prefilters (what another prefilter costs, in the same binary).
    let alt: Vec<(String, String)> = std::env::var("ALT")
        .ok()
        .map(|path| std::fs::read_to_string(path).expect("ALT file"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(id, pre)| (id.to_owned(), pre.to_owned()))
        .collect();
    let specs: Vec<PatternSpec> = (0..scanner.len())
        .map(|i| scanner.pattern(i).clone())
        .filter(|s| !skip.contains(&s.id.as_str()))
        .map(|mut s| {
            if let Some((_, pre)) = alt.iter().find(|(id, _)| *id == s.id) {
                s.prefilter = Some(pre.clone());
            }
            s
        })
        .collect();
    let fewer = (specs.len() < scanner.len() || !alt.is_empty())
        .then(|| Scanner::compile(specs.clone(), 8192).expect("packs compile"));
    let scanner: &Scanner = fewer.as_ref().unwrap_or(scanner);
    // `CORPUS=file`: scan that file (real code, say) instead.
    let data = match std::env::var("CORPUS") {
        Ok(path) => std::fs::read(path).expect("CORPUS file"),
        Err(_) => corpus(mb),
    };
    if let Ok(path) = std::env::var("DUMP_CORPUS") {
        std::fs::write(path, &data).unwrap();
    }
    let chunk = 64 * 1024;
    let baseline = std::env::var_os("BASELINE").is_some().then(|| {
        let set = regex::bytes::RegexSetBuilder::new(specs.iter().map(|s| s.regex.as_str()))
            .unicode(false)
            .size_limit(1 << 30)
            .dfa_size_limit(1 << 30)
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
        (set, singles)
    });
    println!(
        "corpus: {:.1} MB, {} patterns, {} KiB chunks",
        data.len() as f64 / 1e6,
        specs.len(),
        chunk / 1024
    );

    if std::env::var_os("PER_PATTERN").is_some() {
        for sp in &specs {
            let one = Scanner::compile(vec![sp.clone()], 8192).unwrap();
            let t = Cpu::now();
            for c in data[..20 << 20].chunks(chunk) {
                one.find(c).unwrap();
            }
            println!("{:<28} {:>8.1} MB/s", sp.id, 20.0 * 1.048576 / t.elapsed());
        }
    }
    if std::env::var_os("PROFILE").is_some() {
        let mut counts = vec![0usize; specs.len()];
        let t = Cpu::now();
        for c in data.chunks(chunk) {
            for i in scanner.candidates(c).unwrap() {
                counts[i] += 1;
            }
        }
        println!(
            "hyperscan pass alone: {:.1} MB/s",
            data.len() as f64 / 1e6 / t.elapsed()
        );
        // Which patterns make the Hyperscan pass slow: the pass without
        // each group of 10 patterns.
        let sample = &data[..data.len().min(20 << 20)];
        let rate = |sc: &Scanner| {
            let t = Cpu::now();
            for c in sample.chunks(chunk) {
                sc.candidates(c).unwrap();
            }
            sample.len() as f64 / 1e6 / t.elapsed()
        };
        let all = rate(scanner);
        let without = |skip: &dyn Fn(usize) -> bool| {
            let rest: Vec<PatternSpec> = specs
                .iter()
                .enumerate()
                .filter(|(i, _)| !skip(*i))
                .map(|(_, s)| s.clone())
                .collect();
            rate(&Scanner::compile(rest, 8192).unwrap())
        };
        for g in (0..specs.len()).step_by(10) {
            let r = without(&|i| (g..g + 10).contains(&i));
            println!(
                "without {g:>3}..{:<3} ({}..): {r:.0} MB/s",
                g + 10,
                specs[g].id
            );
            if r > all * 1.1 {
                for (i, sp) in specs.iter().enumerate().skip(g).take(10) {
                    println!("    without {:<30} {:.0} MB/s", sp.id, without(&|j| j == i));
                }
            }
        }
        let mut by: Vec<_> = counts.iter().enumerate().filter(|(_, &n)| n > 0).collect();
        by.sort_by_key(|(_, &n)| std::cmp::Reverse(n));
        for (i, n) in by.into_iter().take(15) {
            println!("{:<32} confirmed in {n} chunks", specs[i].id);
        }
    }
    let mut best = f64::MAX;
    let mut hits = 0;
    for _round in 0..3 {
        let t = Cpu::now();
        let mut h = 0;
        for c in data.chunks(chunk) {
            h += scanner.find(c).expect("scan").len();
        }
        best = best.min(t.elapsed());
        hits = h;
    }
    let mbs = |s: f64| data.len() as f64 / 1e6 / s;
    println!(
        "{:<28} {:>10} {:>8}",
        "engine (1 core, CPU time)", "MB/s", "hits"
    );
    println!(
        "{:<28} {:>10.1} {:>8}",
        "hyperscan + regex spans",
        mbs(best),
        hits
    );
    if let Some((set, singles)) = baseline {
        let t = Cpu::now();
        let mut h = 0;
        for c in data.chunks(chunk) {
            for i in set.matches(c).iter() {
                h += singles[i].find_iter(c).count();
            }
        }
        let s = t.elapsed();
        println!("{:<28} {:>10.1} {:>8}", "regex RegexSet + spans", mbs(s), h);
        println!("ratio hyperscan / RegexSet: {:.2}x", s / best);
    }
    println!(
        "scan: {:.0} MB/s per core with {} patterns (secrets + pii)",
        mbs(best),
        specs.len()
    );
    // With every opt-in personal-data pattern too (phone numbers, IBANs,
    // national identifiers, IP addresses): digit-heavy, validated.
    let all = "version: 1\nname: bench\nrules:\n  - id: all\n    on: response\n    packs: [secrets, \"pii/*\"]\n    action: mask\n";
    let policy = CompiledPolicy::compile(all, "bench", 8192).expect("packs compile");
    let scanner: &Scanner = policy.as_ref();
    let mut best = f64::MAX;
    for _round in 0..3 {
        let t = Cpu::now();
        for c in data.chunks(chunk) {
            scanner.find(c).expect("scan");
        }
        best = best.min(t.elapsed());
    }
    println!(
        "scan: {:.0} MB/s per core with {} patterns (secrets + every pii pattern)",
        mbs(best),
        scanner.len()
    );
}
