//! Streamed-answer masking benchmark (`cargo xtask bench stream`): an
//! OpenAI-style chat completion streamed as SSE events of a few characters
//! each, through the masker with the example policy's response rules (the
//! full secrets + PII packs). Reports what the hold-back costs a client:
//! how many events each event waits (0 = sent as soon as it arrived), the
//! first content event's wait (time to first byte), and CPU per event.
use std::{sync::Arc, time::Instant};

use node_agent::{
    policy::{bundle::EMBEDDED_DEFAULT, CompiledPolicy},
    scan::{Framing, StreamMasker},
};

const ANSWER: &str = r#"Sure. Here is a function that reads the configuration and retries the
request with exponential backoff:

```python
def fetch(url, retries=3):
    for attempt in range(retries):
        try:
            return session.get(url, timeout=10).json()
        except requests.Timeout:
            time.sleep(2 ** attempt)
    raise RuntimeError(f"gave up on {url}")
```

Set the token in your CI settings (never in the repository). For example
GITHUB_TOKEN=ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8 and the key
AKIAQ5TESTKEYSLUICE7 belong in the secret store. Then run `make deploy`
and check the logs; contact ops@example.com if the job fails.
"#;

fn events(text: &str, step: usize) -> Vec<Vec<u8>> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    for part in chars.chunks(step) {
        let s: String = part.iter().collect();
        let v = serde_json::json!({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-bench", "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": {"content": s}, "logprobs": null, "finish_reason": null}]
        });
        out.push(format!("data: {v}\n\n").into_bytes());
    }
    out.push(b"data: [DONE]\n\n".to_vec());
    out
}

fn main() {
    let policy = Arc::new(
        CompiledPolicy::compile(EMBEDDED_DEFAULT, "bench", 4096).expect("example policy compiles"),
    );
    let patterns = (*policy).as_ref().len();
    println!("stream masking: example policy, {patterns} response patterns, OpenAI SSE deltas");
    println!(
        "{:>6} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "chars", "events", "ttfb(ev)", "mean(ev)", "p99(ev)", "max(ev)", "us/event"
    );
    for step in [1usize, 3, 8] {
        let evs = events(&ANSWER.repeat(20), step);
        let mut best_us = f64::MAX;
        let mut delays = Vec::new();
        for _round in 0..5 {
            let p = policy.clone();
            let mut m = StreamMasker::new(
                policy.clone(),
                Framing::Sse,
                Box::new(move |r| p.rule(r).action == node_agent::policy::bundle::Action::Mask),
            );
            delays.clear();
            let mut released = 0usize;
            let t = Instant::now();
            for (i, e) in evs.iter().enumerate() {
                let out = m.push(e).expect("scan");
                let n = out.windows(2).filter(|w| w == b"\n\n").count();
                for _ in 0..n {
                    delays.push(i - released);
                    released += 1;
                }
            }
            let tail = m.finish().expect("scan");
            let n = tail.windows(2).filter(|w| w == b"\n\n").count();
            for _ in 0..n {
                delays.push(evs.len() - released);
                released += 1;
            }
            assert_eq!(released, evs.len(), "every event comes out");
            best_us = best_us.min(t.elapsed().as_secs_f64() * 1e6 / evs.len() as f64);
        }
        let ttfb = delays.first().copied().unwrap_or(0);
        let mean = delays.iter().sum::<usize>() as f64 / delays.len() as f64;
        let mut sorted = delays.clone();
        sorted.sort_unstable();
        let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
        let max = sorted.last().copied().unwrap_or(0);
        println!(
            "{step:>6} {:>8} {ttfb:>10} {mean:>10.2} {p99:>10} {max:>10} {best_us:>10.1}",
            evs.len()
        );
    }
    println!("(ev = events a client waits beyond the one that completed them; at ~30 ms per event from a model, 1 ev ≈ 30 ms)");
}
