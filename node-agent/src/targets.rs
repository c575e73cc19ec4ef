//! Keeps the kernel's target set equal to the configuration: literal
//! addresses and CIDRs as given, host names resolved with the system
//! resolver (so /etc/hosts and nsswitch apply, as for the jobs themselves)
//! and resolved again every `dns.refresh_secs`, so that changed records
//! are followed.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use ipnet::IpNet;
use tracing::{info, warn};

use crate::{
    config::{target_id, Target, TlsMode},
    redirect::{Redirector, TargetEntry},
};

/// Entries for the parts of the configuration that need no DNS.
fn static_entries(targets: &[Target]) -> BTreeSet<TargetEntry> {
    let mut out = BTreeSet::new();
    for t in targets {
        for a in &t.addresses {
            push(&mut out, a.0, t, target_id(&t.name));
        }
    }
    out
}

fn push(out: &mut BTreeSet<TargetEntry>, net: IpNet, t: &Target, target_id: u32) {
    if t.ports.is_empty() {
        out.insert(TargetEntry {
            net,
            port: 0,
            target_id,
        });
    }
    for &port in &t.ports {
        out.insert(TargetEntry {
            net,
            port,
            target_id,
        });
    }
}

/// How host names are looked up: the system resolver in production, a
/// scripted one in tests.
pub trait Lookup {
    fn lookup(
        &self,
        host: &str,
    ) -> impl std::future::Future<Output = std::io::Result<Vec<IpAddr>>> + Send;
}

/// getaddrinfo through tokio: the resolver the jobs themselves use.
pub struct SystemLookup;

impl Lookup for SystemLookup {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        Ok(tokio::net::lookup_host((host, 0))
            .await?
            .map(|a| a.ip())
            .collect())
    }
}

/// Resolves every host name; a name that fails keeps its previous
/// addresses rather than dropping out of the set (a DNS hiccup must not
/// open a bypass). Loopback and unspecified answers are ignored: they
/// would send the proxy's own address space back to itself.
pub async fn resolve_all(
    targets: &[Target],
    previous: &BTreeSet<TargetEntry>,
    dns: &impl Lookup,
) -> BTreeSet<TargetEntry> {
    let mut out = static_entries(targets);
    for t in targets {
        let id = target_id(&t.name);
        for host in &t.hosts {
            match dns.lookup(host).await {
                Ok(addrs) => {
                    for ip in addrs {
                        if ip.is_loopback() || ip.is_unspecified() {
                            warn!(target_name = %t.name, %host, %ip, "ignoring loopback/unspecified answer for a target");
                            continue;
                        }
                        push(&mut out, IpNet::from(ip), t, id);
                    }
                }
                Err(e) => {
                    warn!(target_name = %t.name, %host, error = %e, "cannot resolve target host; keeping previous addresses");
                    let prev_hosts: Vec<_> = previous
                        .iter()
                        .filter(|e| e.target_id == id)
                        .copied()
                        .collect();
                    out.extend(prev_hosts);
                }
            }
        }
    }
    out
}

/// Installs the set, then refreshes it every `refresh` and at once when
/// the target list is replaced (a policy bundle with targets).
pub async fn maintain(redirector: Arc<Redirector>, live: Arc<LiveTargets>, refresh: Duration) {
    let mut rx = live.subscribe();
    let mut current = BTreeSet::new();
    loop {
        let targets = rx.borrow_and_update().clone();
        let wanted = resolve_all(&targets, &current, &SystemLookup).await;
        if wanted != current {
            match redirector.sync(&wanted) {
                Ok(()) => {
                    info!(entries = wanted.len(), "target set updated");
                    current = wanted;
                }
                Err(e) => warn!(error = %e, "updating the kernel target set failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(refresh) => {}
            _ = rx.changed() => {}
        }
    }
}

/// The targets in force, by their stable id.
pub struct TargetTable {
    by_id: HashMap<u32, Target>,
}

impl TargetTable {
    pub fn new(targets: &[Target]) -> Self {
        Self {
            by_id: targets
                .iter()
                .map(|t| (target_id(&t.name), t.clone()))
                .collect(),
        }
    }

    pub fn name(&self, id: u32) -> Option<&str> {
        self.by_id.get(&id).map(|t| t.name.as_str())
    }

    pub fn mode(&self, id: u32) -> TlsMode {
        self.by_id.get(&id).map(|t| t.tls).unwrap_or_default()
    }

    /// Whether `sni` is one of the names target `id` intercepts.
    pub fn intercepts(&self, id: u32, sni: &str) -> bool {
        let Some(t) = self.by_id.get(&id) else {
            return false;
        };
        t.tls == TlsMode::Intercept
            && t.names().any(|n| match n.strip_prefix("*.") {
                Some(base) => sni.ends_with(&format!(".{base}")),
                None => n.eq_ignore_ascii_case(sni),
            })
    }
}

/// The live target list: the node configuration's, or a policy bundle's.
pub struct LiveTargets {
    table: RwLock<Arc<TargetTable>>,
    tx: tokio::sync::watch::Sender<Arc<Vec<Target>>>,
}

impl LiveTargets {
    pub fn new(targets: Vec<Target>) -> Self {
        let table = TargetTable::new(&targets);
        let (tx, _) = tokio::sync::watch::channel(Arc::new(targets));
        Self {
            table: RwLock::new(Arc::new(table)),
            tx,
        }
    }

    pub fn current(&self) -> Arc<TargetTable> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn list(&self) -> Arc<Vec<Target>> {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Vec<Target>>> {
        self.tx.subscribe()
    }

    /// Swaps the list: new connections see it at once, the kernel maps
    /// follow (new entries before stale ones go).
    pub fn replace(&self, targets: Vec<Target>) {
        *self.table.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(TargetTable::new(&targets));
        self.tx.send_replace(Arc::new(targets));
    }
}

/// Installs the literal part of the target set synchronously, before the
/// node reports ready.
pub fn install_static(
    redirector: &Redirector,
    targets: &[Target],
) -> Result<(), crate::redirect::RedirectError> {
    redirector.sync(&static_entries(targets))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::config::TlsMode;

    /// Answers from a script that the test changes between refreshes.
    struct Scripted(Mutex<Result<Vec<IpAddr>, ()>>);

    impl Lookup for Scripted {
        async fn lookup(&self, _host: &str) -> std::io::Result<Vec<IpAddr>> {
            self.0
                .lock()
                .unwrap()
                .clone()
                .map_err(|_| std::io::Error::other("SERVFAIL"))
        }
    }

    fn target() -> Vec<Target> {
        vec![Target {
            name: "api".into(),
            hosts: vec!["api.example.test".into()],
            addresses: vec![],
            ports: vec![443],
            tls: TlsMode::None,
            sni: vec![],
        }]
    }

    fn ips(set: &BTreeSet<TargetEntry>) -> Vec<String> {
        set.iter()
            .map(|e| format!("{}:{}", e.net, e.port))
            .collect()
    }

    #[tokio::test]
    async fn records_are_followed_failures_keep_and_loopback_is_ignored() {
        let t = target();
        let dns = Scripted(Mutex::new(Ok(vec!["192.0.2.1".parse().unwrap()])));
        let first = resolve_all(&t, &BTreeSet::new(), &dns).await;
        assert_eq!(ips(&first), ["192.0.2.1/32:443"]);
        // The record changes: the new address replaces the old one.
        *dns.0.lock().unwrap() = Ok(vec![
            "192.0.2.7".parse().unwrap(),
            "2001:db8::7".parse().unwrap(),
        ]);
        let second = resolve_all(&t, &first, &dns).await;
        assert_eq!(ips(&second), ["192.0.2.7/32:443", "2001:db8::7/128:443"]);
        // A failed lookup keeps what was there.
        *dns.0.lock().unwrap() = Err(());
        let third = resolve_all(&t, &second, &dns).await;
        assert_eq!(third, second);
        // A loopback answer never becomes a target.
        *dns.0.lock().unwrap() = Ok(vec!["127.0.0.1".parse().unwrap()]);
        assert!(resolve_all(&t, &third, &dns).await.is_empty());
    }
}
