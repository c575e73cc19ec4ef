//! Record path cost per exchange: `start_exchange` + `put_exchange` (what
//! the proxy does: two appends, each one `write(2)` to the record log and
//! a queued index entry) against the same plus waiting for a
//! group-committed fsync per exchange (what a design that made every
//! exchange durable before answering would pay).
//! 1 KB request and response bodies; 1 and 8 threads.
//!
//! `cargo run --release -p node-agent --example record_bench [N]`
use std::{sync::Arc, time::Instant};

use node_agent::record::{BodyRecord, Exchange, ExchangeState, Header, RecordStore};

fn exchange(session: u64, seq: u32) -> Exchange {
    let mut body = BodyRecord {
        size: 1024,
        complete: true,
        ..Default::default()
    };
    body.set_bytes(vec![b'x'; 1024]);
    Exchange {
        session,
        seq,
        state: ExchangeState::Started,
        workload: "wl-bench".into(),
        started_at_ms: 1,
        method: "GET".into(),
        authority: "api.example.test".into(),
        path: format!("/v1/items/{seq}"),
        http_version: "HTTP/1.1".into(),
        request_headers: (0..8)
            .map(|i| Header {
                name: format!("x-header-{i}"),
                value: "some header value".into(),
            })
            .collect(),
        request_body: body.clone(),
        request_trailers: vec![],
        status: None,
        response_headers: vec![],
        response_body: BodyRecord::default(),
        response_trailers: vec![],
        ttfb_ms: None,
        duration_ms: 0.0,
        upgrade: None,
        error: None,
        decisions: vec![],
        injected: None,
        tool_calls: Vec::new(),
    }
}

fn run(threads: usize, per_thread: u32, wait_flush: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RecordStore::open(dir.path()).unwrap());
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    let mut ex = exchange(t as u64 + 1, i);
                    store.start_exchange(&ex).unwrap();
                    ex.state = ExchangeState::Complete;
                    ex.status = Some(200);
                    ex.response_body = ex.request_body.clone();
                    store.put_exchange(&ex).unwrap();
                    if wait_flush {
                        store.flush_blocking().unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    t0.elapsed().as_secs_f64() * 1e6 / (threads as f64 * per_thread as f64)
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    println!(
        "| threads | record (log write) µs/exchange | + wait for fsync per exchange µs/exchange |"
    );
    println!("|---|---|---|");
    for threads in [1usize, 8] {
        let per_thread = n / threads as u32;
        let a = run(threads, per_thread, false);
        let b = run(threads, (per_thread / 20).max(50), true);
        println!("| {threads} | {a:.1} | {b:.1} |");
    }
}
