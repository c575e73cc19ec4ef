//! The per-connection context every protocol handler drives its stages
//! with: who is connecting (identity), to what (target), under which
//! policy, suspensions and approvals, and where its evidence goes. The
//! admission stage in `proxy.rs` builds one per admitted connection; a
//! protocol module (`http`, `postgres`) turns each message into a verdict
//! (the stages in `verdict.rs`) and a record through it.
use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use crate::{
    approvals::Approvals,
    config::Limits,
    identity::WorkloadIdentity,
    policy::{CompiledPolicy, PolicyEngine},
    record::{RecordHealth, RecordStore},
    suspend::Suspensions,
};

pub struct Session {
    /// The connection record's id (also the `session` of its exchanges
    /// and statements).
    pub id: u64,
    pub identity: WorkloadIdentity,
    /// The target's name from the configuration or bundle in force.
    pub target: String,
    pub store: Arc<RecordStore>,
    pub policy: Arc<PolicyEngine>,
    pub approvals: Arc<Approvals>,
    pub suspensions: Arc<Suspensions>,
    pub health: Arc<RecordHealth>,
    pub limits: Limits,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The bundle's workload name for the identity (metrics label).
    pub workload_name: String,
    /// Sequence of the next exchange or statement on this connection.
    next_seq: AtomicU32,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        identity: WorkloadIdentity,
        target: String,
        store: Arc<RecordStore>,
        policy: Arc<PolicyEngine>,
        approvals: Arc<Approvals>,
        suspensions: Arc<Suspensions>,
        health: Arc<RecordHealth>,
        limits: Limits,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let workload_name = crate::metrics::workload_label(&identity, &policy.current());
        Self {
            metrics,
            workload_name,
            id,
            identity,
            target,
            store,
            policy,
            approvals,
            suspensions,
            health,
            limits,
            next_seq: AtomicU32::new(0),
        }
    }

    /// The workload identity's id, as logs and records name it.
    pub fn workload(&self) -> &str {
        &self.identity.id
    }

    pub fn next_seq(&self) -> u32 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The policy in force now (one snapshot per message).
    pub fn policy(&self) -> Arc<CompiledPolicy> {
        self.policy.current()
    }

    /// An exchange or statement completed: counted for metrics.
    pub fn observe_exchange(&self, ex: &crate::record::Exchange) {
        self.metrics.exchange(&self.target, &self.workload_name, ex);
    }

    pub fn observe_statement(&self, st: &crate::record::Statement) {
        self.metrics
            .statement(&self.target, &self.workload_name, st);
    }

    /// A failed record write: the store's health goes to failing (new
    /// connections are refused until a flush succeeds).
    pub fn record_failed(&self, e: &dyn std::fmt::Display) {
        self.health.failed(e);
        tracing::warn!(session = self.id, workload = %self.identity.id, error = %e, "recording failed");
    }
}

/// Resolves once `activity` (a byte count, both directions) has not moved
/// for `idle`.
pub async fn idle_for(idle: std::time::Duration, activity: impl Fn() -> u64) {
    let tick = (idle / 4).clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(5),
    );
    let mut last = activity();
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = activity();
        if now != last {
            last = now;
            quiet_since = tokio::time::Instant::now();
        } else if quiet_since.elapsed() >= idle {
            return;
        }
    }
}
