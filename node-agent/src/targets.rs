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
    config::{target_id, Target, TlsMode, UnknownSni},
    names::{DnsName, NameError, NamePattern},
    redirect::{Redirector, TargetEntry},
    tls::hello::ClientHello,
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

/// The targets in force, by their stable id, with their names compiled.
pub struct TargetTable {
    by_id: HashMap<u32, (Target, Vec<NamePattern>)>,
}

/// What to do with a TLS connection to a target, decided from its
/// ClientHello alone (the job controls every byte of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SniVerdict {
    /// Terminate TLS for this (normalised) target name.
    Intercept(DnsName),
    /// Relay byte for byte; the reason goes to the log.
    Splice(String),
    /// Reset and record why.
    Refuse(String),
}

impl TargetTable {
    pub fn new(targets: &[Target]) -> Self {
        Self {
            by_id: targets
                .iter()
                .map(|t| {
                    // Validated names; one that is not (it cannot be, after
                    // validation) simply never matches.
                    let names = t
                        .names()
                        .filter_map(|n| NamePattern::parse(n).ok())
                        .collect();
                    (target_id(&t.name), (t.clone(), names))
                })
                .collect(),
        }
    }

    pub fn name(&self, id: u32) -> Option<&str> {
        self.by_id.get(&id).map(|(t, _)| t.name.as_str())
    }

    /// Whether `name` is one of the target's exact names (not only
    /// under one of its wildcards).
    pub fn names_exactly(&self, id: u32, name: &str) -> bool {
        let (Some((_, names)), Ok(name)) = (self.by_id.get(&id), DnsName::parse(name)) else {
            return false;
        };
        names
            .iter()
            .any(|p| matches!(p, NamePattern::Exact(_)) && p.matches(&name))
    }

    /// The target's configuration (names, ports, protocol settings).
    pub fn target(&self, id: u32) -> Option<&Target> {
        self.by_id.get(&id).map(|(t, _)| t)
    }

    pub fn protocol(&self, id: u32) -> crate::config::Protocol {
        self.by_id
            .get(&id)
            .map_or(crate::config::Protocol::Tcp, |(t, _)| t.protocol())
    }

    pub fn mode(&self, id: u32) -> TlsMode {
        self.by_id.get(&id).map(|(t, _)| t.tls).unwrap_or_default()
    }

    /// Intercept, splice or refuse: only a normalised SNI that is one of
    /// the target's names is intercepted. ECH is refused on `intercept`
    /// targets whatever `unknown_sni` says (the real name is encrypted,
    /// and could be a target's); no SNI, an IP literal or another name
    /// follows `unknown_sni` (refuse by default).
    pub fn classify(&self, id: u32, hello: &ClientHello) -> SniVerdict {
        let Some((t, names)) = self.by_id.get(&id) else {
            return SniVerdict::Refuse("unknown target".into());
        };
        if t.tls != TlsMode::Intercept {
            return SniVerdict::Splice(format!("target `{}` is passthrough", t.name));
        }
        if hello.ech {
            return SniVerdict::Refuse(format!(
                "encrypted ClientHello (ECH) to target `{}`: the real server name is hidden (outer name {:?})",
                t.name, hello.sni
            ));
        }
        let unknown = match hello.sni.as_deref().map(DnsName::parse) {
            Some(Ok(name)) if names.iter().any(|p| p.matches(&name)) => {
                return SniVerdict::Intercept(name)
            }
            Some(Ok(name)) => format!("SNI `{name}` is not a name of target `{}`", t.name),
            Some(Err(NameError::IpLiteral(ip))) => {
                format!("IP-literal SNI `{ip}` to target `{}`", t.name)
            }
            Some(Err(e)) => format!("invalid SNI to target `{}`: {e}", t.name),
            None => format!("no SNI in the ClientHello to target `{}`", t.name),
        };
        match t.unknown_sni {
            UnknownSni::Refuse => SniVerdict::Refuse(unknown),
            UnknownSni::Splice => SniVerdict::Splice(unknown),
        }
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
            unknown_sni: UnknownSni::Refuse,
            protocol: None,
            postgres: Default::default(),
        }]
    }

    fn hello(sni: Option<&str>, ech: bool) -> ClientHello {
        ClientHello {
            sni: sni.map(str::to_owned),
            alpn: vec![],
            ech,
        }
    }

    #[test]
    fn exact_names_are_told_from_wildcard_ones() {
        let mut t = target();
        t[0].tls = TlsMode::Intercept;
        t[0].sni = vec!["*.openai.azure.com".into()];
        let id = target_id("api");
        let table = TargetTable::new(&t);
        // api.example.test is a host name: exact; a subdomain of the
        // wildcard is not (it could be anyone's).
        assert!(table.names_exactly(id, "API.example.test"));
        assert!(!table.names_exactly(id, "attacker.openai.azure.com"));
        assert!(!table.names_exactly(id, "other.test"));
        assert!(!table.names_exactly(id + 1, "api.example.test"));
    }

    #[test]
    fn sni_decides_intercept_refuse_or_splice() {
        let mut t = target();
        t[0].tls = TlsMode::Intercept;
        t[0].sni = vec!["*.cdn.test".into()];
        let id = target_id("api");
        let table = TargetTable::new(&t);
        let v = |sni, ech| table.classify(id, &hello(sni, ech));
        let api = DnsName::parse("api.example.test").unwrap();
        assert_eq!(
            v(Some("api.example.test"), false),
            SniVerdict::Intercept(api.clone())
        );
        assert_eq!(
            v(Some("API.Example.Test."), false),
            SniVerdict::Intercept(api)
        );
        assert!(matches!(
            v(Some("x.cdn.test"), false),
            SniVerdict::Intercept(_)
        ));
        for (sni, why) in [
            (Some("other.example.test"), "not a name of target"),
            (None, "no SNI"),
            (Some("10.1.2.3"), "IP-literal SNI"),
            (Some("bad name"), "invalid SNI"),
        ] {
            match v(sni, false) {
                SniVerdict::Refuse(r) => assert!(r.contains(why), "{r}"),
                other => panic!("{sni:?}: {other:?}"),
            }
        }
        assert!(
            matches!(v(Some("api.example.test"), true), SniVerdict::Refuse(r) if r.contains("ECH"))
        );

        // Opt-in: unknown names are spliced; ECH is still refused.
        t[0].unknown_sni = UnknownSni::Splice;
        let table = TargetTable::new(&t);
        let v = |sni, ech| table.classify(id, &hello(sni, ech));
        assert!(matches!(
            v(Some("other.example.test"), false),
            SniVerdict::Splice(_)
        ));
        assert!(matches!(v(None, false), SniVerdict::Splice(_)));
        assert!(matches!(
            v(Some("api.example.test"), false),
            SniVerdict::Intercept(_)
        ));
        assert!(matches!(
            v(Some("other.example.test"), true),
            SniVerdict::Refuse(_)
        ));
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
