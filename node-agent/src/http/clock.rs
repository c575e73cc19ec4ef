//! The HTTP/1.1 header-read deadline, counted from the first byte of a
//! request head. hyper starts its header timer as soon as it waits for
//! the next request, so a keep-alive connection idle between requests was
//! cut after `header_read_timeout_secs` (30 s) instead of
//! `idle_timeout_secs`. This timer, given to hyper's HTTP/1.1 server only
//! (it uses a timer for nothing else), counts from the first byte the
//! client sends after hyper starts waiting; the first head of a
//! connection is counted from the start. Idle connections are closed by
//! the connection's idle guard instead (`session::idle_for`).
use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::rt::{Sleep, Timer};

/// Bytes received from the client so far.
pub type Received = Arc<dyn Fn() -> u64 + Send + Sync>;

pub struct HeaderClock {
    received: Received,
    /// The first head wait of the connection counts from its start.
    started: AtomicBool,
}

impl HeaderClock {
    pub fn new(received: Received) -> Self {
        Self {
            received,
            started: AtomicBool::new(false),
        }
    }
}

impl Timer for HeaderClock {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        let first = !self.started.swap(true, Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        Box::pin(FirstByte {
            duration,
            received: self.received.clone(),
            armed_at: (self.received)(),
            counting_since: first.then_some(now),
            tick: Box::pin(tokio::time::sleep_until(if first {
                now + duration
            } else {
                now + poll_every(duration)
            })),
        })
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        self.sleep(deadline.saturating_duration_since(Instant::now()))
    }
}

/// How often a waiting deadline looks for the first byte.
fn poll_every(d: Duration) -> Duration {
    (d / 4).clamp(Duration::from_millis(50), Duration::from_secs(2))
}

struct FirstByte {
    duration: Duration,
    received: Received,
    armed_at: u64,
    counting_since: Option<tokio::time::Instant>,
    tick: Pin<Box<tokio::time::Sleep>>,
}

impl Future for FirstByte {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.counting_since.is_none() && (self.received)() > self.armed_at {
                let now = tokio::time::Instant::now();
                self.counting_since = Some(now);
                let until = now + self.duration;
                self.tick.as_mut().reset(until);
            }
            if self.tick.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.counting_since.is_some() {
                return Poll::Ready(());
            }
            let next = tokio::time::Instant::now() + poll_every(self.duration);
            self.tick.as_mut().reset(next);
        }
    }
}

impl Sleep for FirstByte {}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_from_the_first_byte_after_the_first_head() {
        let bytes = Arc::new(AtomicU64::new(100));
        let b = bytes.clone();
        let clock = HeaderClock::new(Arc::new(move || b.load(Ordering::Relaxed)));
        let t = Duration::from_secs(30);
        // The connection's first head: from the start.
        let start = tokio::time::Instant::now();
        clock.sleep(t).await;
        assert_eq!(start.elapsed(), t);
        // Later heads: an idle hour does not end it...
        let mut next = clock.sleep(t);
        let idle = tokio::time::timeout(Duration::from_secs(3600), next.as_mut()).await;
        assert!(
            idle.is_err(),
            "an idle keep-alive connection is not a slow header"
        );
        // ...a byte starts the count.
        bytes.fetch_add(1, Ordering::Relaxed);
        let from = tokio::time::Instant::now();
        next.await;
        let took = from.elapsed();
        assert!(took >= t && took <= t + Duration::from_secs(2), "{took:?}");
    }
}
