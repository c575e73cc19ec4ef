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
    tool_calls();
}

/// A chat stream whose answer is text and then a tool call, through the
/// tool-call guard with the agent pack (as the node runs it after the
/// masker): CPU per event with and without the guard, and per whole call.
fn tool_calls() {
    use node_agent::{
        policy::Verdict,
        tools::stream::{Ruling, Step, ToolGuard},
    };
    let bundle = "version: 1\nname: bench\nrules:\n  - id: agent\n    on: tool_call\n    packs: [agent]\n    action: block\n";
    let policy = Arc::new(CompiledPolicy::compile(bundle, "bench", 4096).expect("agent pack"));
    let args = serde_json::json!({
        "command": "cd /home/runner/work/app/app && cargo test --workspace 2>&1 | tail -50",
        "is_background": false,
        "explanation": "Run the test suite to check the change.",
    })
    .to_string();
    let mut text_events = events(&ANSWER.repeat(4), 3);
    let chunk = |delta: serde_json::Value| {
        format!(
            "data: {}\n\n",
            serde_json::json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
        )
        .into_bytes()
    };
    let mut call_events = vec![chunk(
        serde_json::json!({"tool_calls": [{"index": 0, "id": "call_1",
        "type": "function", "function": {"name": "run_terminal_cmd", "arguments": ""}}]}),
    )];
    let chars: Vec<char> = args.chars().collect();
    for piece in chars.chunks(3) {
        call_events.push(chunk(serde_json::json!({"tool_calls": [{"index": 0,
            "function": {"arguments": piece.iter().collect::<String>()}}]})));
    }
    call_events.push(b"data: [DONE]\n\n".to_vec());
    text_events.append(&mut call_events);
    let evs = text_events;
    let mut best = [f64::MAX; 2];
    for _round in 0..20 {
        for (k, guarded) in [false, true].into_iter().enumerate() {
            let p = policy.clone();
            let mut guard = guarded.then(|| {
                ToolGuard::new(Box::new(move |call| {
                    match p.evaluate_tool_call_where(call, |_| true) {
                        Ok((Verdict::Allow, _)) => Ruling::Allow,
                        Ok((_, _)) | Err(_) => Ruling::Block {
                            rule: "agent".into(),
                            message: "blocked".into(),
                        },
                    }
                }))
            });
            let t = Instant::now();
            let mut out = 0usize;
            for e in &evs {
                out += match &mut guard {
                    Some(g) => match g.push(e) {
                        Step::Pass(b) => b.len(),
                        Step::Blocked { .. } | Step::Wait(_) => {
                            panic!("an everyday call was blocked or held")
                        }
                    },
                    None => std::hint::black_box(e.clone()).len(),
                };
            }
            if let Some(g) = &mut guard {
                assert!(matches!(g.finish(), Step::Pass(_)));
            }
            std::hint::black_box(out);
            best[k] = best[k].min(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    println!(
        "tool-call guard (agent pack, {} patterns): {} events, one {}-byte call: {:.2} us per event added (each event read as JSON), {:.0} us per stream in all",
        policy.tool_scanner().len(),
        evs.len(),
        args.len(),
        (best[1] - best[0]) / evs.len() as f64,
        best[1] - best[0]
    );
}
