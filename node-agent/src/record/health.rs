//! Whether recording works: set by a failed write, cleared by a flush
//! that succeeds. The proxy refuses new connections while it fails.
use std::time::Duration;

use tracing::info;

use super::{now_ms, RecordStore};

/// Whether the store is taking writes. Set by any failed write or flush,
/// cleared by a successful flush. While it is failing, a new connection
/// first probes with a flush and is refused if that fails too (fail
/// closed: a disk that is full or gone means nothing is forwarded).
#[derive(Default)]
pub struct RecordHealth {
    failing: std::sync::Mutex<Option<(String, u64)>>,
}

impl RecordHealth {
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            tracing::error!(error = %error, "RECORDING FAILING: new connections are refused until writes succeed");
        }
        *f = Some((
            error.to_string(),
            f.as_ref().map_or_else(now_ms, |(_, t)| *t),
        ));
    }

    pub fn ok(&self) {
        let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if f.take().is_some() {
            info!("recording works again");
        }
    }

    /// `ok`, or `failing since <time>: <error>`.
    pub fn describe(&self) -> String {
        match &*self.failing.lock().unwrap_or_else(|e| e.into_inner()) {
            None => "ok".into(),
            Some((e, since)) => format!(
                "failing since {}: {e}",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(*since)
                )
            ),
        }
    }

    pub fn is_failing(&self) -> bool {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// A flush whose outcome updates the state.
    pub async fn flush(&self, store: &RecordStore) -> bool {
        match store.flush().await {
            Ok(()) => {
                self.ok();
                true
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }
}
