//! Prometheus metrics (`GET /metrics` on `metrics.listen`, loopback by
//! default), with the `prometheus-client` crate the service-mesh proxies
//! use. Labels are bounded: target names come from the configuration,
//! workloads are the bundle's workload names (not identity ids), rules
//! the bundle's rule ids, and refusal reasons a fixed set of classes.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{service::service_fn, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::{error, info, warn};

use crate::record::{Action, ConnectionRecord, Decision, Exchange, Outcome, Statement};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub target: String,
    pub workload: String,
    /// closed, refused, upstream_failed, failed, interrupted
    pub outcome: String,
    /// For refusals: no_origin, unattributable, quarantined,
    /// identity_limit, suspended, loop, recording, tls, other.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub target: String,
    /// up (job to upstream) or down
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabels {
    pub target: String,
    pub workload: String,
    /// 2xx..5xx, or error
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatementLabels {
    pub target: String,
    pub workload: String,
    pub class: String,
    /// ok, error, refused
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub target: String,
    pub rule: String,
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub target: String,
    pub workload: String,
    /// `verdict::DenialKind`: suspended, blocked, not_approved,
    /// scan_failed, uninspectable, too_large, unreadable, misdirected,
    /// not_recorded, misconfigured, uninspectable_response
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApprovalLabels {
    pub target: String,
    pub rule: String,
    /// approved, denied, timed_out
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KernelLabels {
    pub event: String,
}

/// What the node counts as it goes; node-wide values (active connections,
/// approvals, policy, kernel counters) are read when scraped.
pub struct Metrics {
    registry: Registry,
    pub connections: Family<ConnLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub exchanges: Family<ExchangeLabels, Counter>,
    pub statements: Family<StatementLabels, Counter>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub denials: Family<DenialLabels, Counter>,
    pub approvals_decided: Family<ApprovalLabels, Counter>,
    pub kernel: Family<KernelLabels, Counter>,
    pub connections_active: Gauge,
    pub approvals_pending: Gauge,
    pub policy_version: Gauge,
    pub policy_applied_seconds: Gauge,
    pub record_errors: Gauge,
    pub jobs_quarantined: Gauge,
    pub spool_pending: Gauge,
    pub spool_bytes: Gauge,
    pub spool_dropped: Gauge,
    pub ship_lag_seconds: Gauge,
    /// Scrapes are serialised (kernel counters are topped up per scrape).
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let m = Self {
            registry: Registry::default(),
            connections: Family::default(),
            bytes: Family::default(),
            exchanges: Family::default(),
            statements: Family::default(),
            decisions: Family::default(),
            denials: Family::default(),
            approvals_decided: Family::default(),
            kernel: Family::default(),
            connections_active: Gauge::default(),
            approvals_pending: Gauge::default(),
            policy_version: Gauge::default(),
            policy_applied_seconds: Gauge::default(),
            record_errors: Gauge::default(),
            jobs_quarantined: Gauge::default(),
            spool_pending: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_dropped: Gauge::default(),
            ship_lag_seconds: Gauge::default(),
            scrape: Mutex::new(()),
        };
        registry.register(
            "connections",
            "Connections ended, by target, workload, outcome and refusal reason",
            m.connections.clone(),
        );
        registry.register(
            "denials",
            "Requests, statements and WebSocket messages the node refused, by target, workload and kind",
            m.denials.clone(),
        );
        registry.register(
            "bytes",
            "Bytes relayed, by target and direction",
            m.bytes.clone(),
        );
        registry.register(
            "exchanges",
            "HTTP exchanges recorded, by target, workload and status class",
            m.exchanges.clone(),
        );
        registry.register(
            "statements",
            "Database statements recorded, by target, workload, class and outcome",
            m.statements.clone(),
        );
        registry.register(
            "policy_decisions",
            "Policy decisions (mask, block, approve, log), by target, rule and action",
            m.decisions.clone(),
        );
        registry.register(
            "approvals_decided",
            "Held requests and statements decided, by target, rule and decision",
            m.approvals_decided.clone(),
        );
        registry.register(
            "kernel_events",
            "Kernel program counters (redirected, refused, killed...)",
            m.kernel.clone(),
        );
        registry.register(
            "connections_active",
            "Connections being forwarded now",
            m.connections_active.clone(),
        );
        registry.register(
            "approvals_pending",
            "Requests and statements held for a human",
            m.approvals_pending.clone(),
        );
        registry.register(
            "policy_version",
            "Version of the policy bundle in force",
            m.policy_version.clone(),
        );
        registry.register(
            "policy_applied_timestamp_seconds",
            "When the bundle in force was applied (Unix time; 0 for the embedded policy)",
            m.policy_applied_seconds.clone(),
        );
        registry.register(
            "record_errors",
            "Record writes that failed since start",
            m.record_errors.clone(),
        );
        registry.register(
            "jobs_quarantined",
            "Jobs stopped for working against the node",
            m.jobs_quarantined.clone(),
        );
        registry.register(
            "spool_pending_events",
            "Events spooled and not yet acknowledged by the stream",
            m.spool_pending.clone(),
        );
        registry.register(
            "spool_bytes",
            "Bytes of spool segments on disk",
            m.spool_bytes.clone(),
        );
        registry.register(
            "spool_dropped_events",
            "Events dropped from a full spool (spool.when_full: drop-oldest)",
            m.spool_dropped.clone(),
        );
        registry.register(
            "ship_lag_seconds",
            "Age of the oldest event not yet acknowledged by the stream",
            m.ship_lag_seconds.clone(),
        );
        Self { registry, ..m }
    }
}

/// The workload label: the node configuration's selector name for the
/// identity, else the bundle's workload name, else `-` (never the
/// identity id: one series per CI job would grow without bound).
pub fn workload_label(
    identity: &crate::identity::WorkloadIdentity,
    policy: &crate::policy::CompiledPolicy,
) -> String {
    identity
        .workload
        .clone()
        .unwrap_or_else(|| policy.workload_name(identity).to_owned())
}

impl Metrics {
    /// A connection's final record.
    pub fn connection(&self, r: &ConnectionRecord, workload: &str) {
        let (outcome, reason) = match &r.outcome {
            Outcome::Open => return,
            Outcome::Closed => ("closed", ""),
            Outcome::Refused { kind, .. } => ("refused", kind.as_str()),
            Outcome::UpstreamFailed { .. } => ("upstream_failed", ""),
            Outcome::Failed { .. } => ("failed", ""),
            Outcome::Interrupted => ("interrupted", ""),
        };
        let target = r.target.clone().unwrap_or_else(|| "-".into());
        self.connections
            .get_or_create(&ConnLabels {
                target: target.clone(),
                workload: workload.to_owned(),
                outcome: outcome.into(),
                reason: reason.into(),
            })
            .inc();
        for (direction, n) in [("up", r.bytes_up), ("down", r.bytes_down)] {
            if n > 0 {
                self.bytes
                    .get_or_create(&BytesLabels {
                        target: target.clone(),
                        direction: direction.into(),
                    })
                    .inc_by(n);
            }
        }
    }

    pub fn exchange(&self, target: &str, workload: &str, ex: &Exchange) {
        let status = match (ex.status, &ex.error) {
            (Some(s), _) => format!("{}xx", s / 100),
            (None, _) => "error".into(),
        };
        self.exchanges
            .get_or_create(&ExchangeLabels {
                target: target.into(),
                workload: workload.into(),
                status,
            })
            .inc();
        self.decided(target, &ex.decisions);
    }

    pub fn statement(&self, target: &str, workload: &str, st: &Statement) {
        let outcome = if st.sqlstate.as_deref() == Some("42501")
            && st
                .decisions
                .iter()
                .any(|d| matches!(d.action, Action::Block | Action::Approve))
        {
            "refused"
        } else if st.error.is_some() {
            "error"
        } else {
            "ok"
        };
        let class = st
            .sql
            .class
            .map(|c| format!("{c:?}").to_ascii_lowercase())
            .unwrap_or_else(|| "unparsed".into());
        self.statements
            .get_or_create(&StatementLabels {
                target: target.into(),
                workload: workload.into(),
                class,
                outcome: outcome.into(),
            })
            .inc();
        self.decided(target, &st.decisions);
    }

    fn decided(&self, target: &str, decisions: &[Decision]) {
        for d in decisions {
            if d.action == Action::Approve {
                // The approval's outcome, as recorded in the decision.
                let detail = d.detail.as_deref().unwrap_or_default();
                let decision = ["approved", "denied", "timed_out"]
                    .into_iter()
                    .find(|k| detail.contains(&format!("\"decision\":\"{k}\"")));
                if let Some(decision) = decision {
                    self.approvals_decided
                        .get_or_create(&ApprovalLabels {
                            target: target.into(),
                            rule: d.rule.clone(),
                            decision: decision.into(),
                        })
                        .inc();
                }
            }
            self.decisions
                .get_or_create(&DecisionLabels {
                    target: target.into(),
                    rule: d.rule.clone(),
                    action: d.action.as_str().into(),
                })
                .inc();
        }
    }

    /// Brings a kernel counter up to `value` (they only grow).
    pub fn kernel_counter(&self, event: &str, value: u64) {
        let c = self.kernel.get_or_create(&KernelLabels {
            event: event.into(),
        });
        let now = c.get();
        if value > now {
            c.inc_by(value - now);
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self, refresh: impl FnOnce(&Self)) -> Result<String, std::fmt::Error> {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        refresh(self);
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Serves `GET /metrics` until the process ends. A bind failure is logged
/// and the node runs on (metrics are not on the data path).
pub async fn serve(addr: SocketAddr, render: Arc<dyn Fn() -> String + Send + Sync>) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            error!(%addr, error = %e, "metrics endpoint not started");
            return;
        }
    };
    info!(%addr, "metrics endpoint on /metrics");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move {
                    let mut resp = if req.uri().path() == "/metrics" {
                        let mut r = Response::new(Full::new(Bytes::from(render())));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        r
                    } else {
                        Response::new(Full::new(Bytes::from_static(b"see /metrics\n")))
                    };
                    if req.uri().path() != "/metrics" {
                        *resp.status_mut() = StatusCode::NOT_FOUND;
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_bounded_labels() {
        let m = Metrics::default();
        let mut r =
            ConnectionRecord::new(1, crate::addr::ClientAddr("127.0.0.1:1".parse().unwrap()));
        r.target = Some("db".into());
        r.outcome = Outcome::Refused {
            reason: "identity has 3 connections open (limit 3)".into(),
            kind: crate::record::Refusal::IdentityLimit,
        };
        m.connection(&r, "ci-jobs");
        // Counted by kind, never by the words (which said "tls" for any
        // reason holding "check", "recording" for "…not a TLS record").
        r.outcome = Outcome::Refused {
            reason: "replication connections are not inspected (a check on the record)".into(),
            kind: crate::record::Refusal::Other,
        };
        m.connection(&r, "ci-jobs");
        m.kernel_counter("redirected", 5);
        m.kernel_counter("redirected", 7);
        let text = m
            .render(|m| {
                m.policy_version.set(12);
            })
            .unwrap();
        assert!(text.contains(r#"sluice_connections_total{target="db",workload="ci-jobs",outcome="refused",reason="identity_limit"} 1"#), "{text}");
        assert!(text.contains(r#"sluice_connections_total{target="db",workload="ci-jobs",outcome="refused",reason="other"} 1"#), "{text}");
        assert!(
            text.contains(r#"sluice_kernel_events_total{event="redirected"} 7"#),
            "{text}"
        );
        assert!(text.contains("sluice_policy_version 12"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
