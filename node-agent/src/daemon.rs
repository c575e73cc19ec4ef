//! `sluice run`: wires configuration, kernel programs, proxy, records and
//! control API together, in the order that makes the node safe to use the
//! moment it says it is ready.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use tracing::{info, warn};

use crate::{
    addr::ProxyAddr,
    approvals::Approvals,
    attribution::IdentityResolver,
    config::{validate_targets, Config, Target, TlsMode},
    contain::{Guard, Quarantine},
    control::{self, ControlServer},
    policy::{PolicyEngine, TargetSink},
    proxy::{self, Counters, Proxy},
    record::RecordStore,
    redirect::{self, Containment, Redirector},
    suspend::Suspensions,
    targets::{self, LiveTargets},
    tls::{Ca, TlsContext},
    watch::PatternWatcher,
};

pub struct RunOptions {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let cfg = Config::load(opts.config.as_deref())?;
    let state_dir = opts.state_dir.unwrap_or_else(|| cfg.state_dir.clone());
    let socket = opts.socket.unwrap_or_else(|| cfg.control_socket.clone());
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    restrict(&state_dir);

    raise_fd_limit();
    let admin = admin_runtime()?;
    // Records first: nothing is intercepted unless it can be recorded.
    let store = Arc::new(
        RecordStore::open_with(&state_dir, (&cfg.records).into())
            .with_context(|| format!("opening records in {}", state_dir.display()))?,
    );

    let root = redirect::cgroup2_root()?;
    let cgroups = cfg
        .watch
        .cgroups
        .iter()
        .map(|c| redirect::watched_cgroup(&root, &c.path, c.create))
        .collect::<Result<Vec<_>, _>>()?;

    // Listen before attaching, so the first redirected connect finds us.
    let v4 = SocketAddr::new(cfg.proxy.listen_v4.into(), cfg.proxy.port);
    let v6 = SocketAddr::new(cfg.proxy.listen_v6.into(), cfg.proxy.port);
    let mut listeners = vec![(v4, proxy::bind(v4).await?)];
    match proxy::bind(v6).await {
        Ok(l) => listeners.push((v6, l)),
        Err(e) => {
            warn!(error = %e, "IPv6 loopback unavailable; IPv6 targets cannot be intercepted")
        }
    }

    let node_dir = redirect::node_pin_dir(&cgroups, &cfg.watch.patterns);
    let redirector = Arc::new(Redirector::load(
        &cgroups,
        &node_dir,
        cfg.watch.bpf_lsm,
        cfg.proxy.listen_v4,
        cfg.proxy.listen_v6,
        cfg.proxy.port,
        cfg.watch.host.enabled.then(|| redirect::HostAttach {
            root: root.clone(),
            exempt: cfg
                .watch
                .host
                .exempt
                .iter()
                .map(|p| redirect::cgroup_path(&root, p))
                .collect(),
        }),
    )?);
    if !cfg.watch.patterns.is_empty() {
        // Attaches to the existing matches before we say ready.
        let watcher = PatternWatcher::new(
            root.clone(),
            &cfg.watch.patterns,
            &cgroups,
            redirector.clone(),
        )?;
        info!(patterns = ?watcher.patterns(), "watching for new cgroups");
        std::thread::Builder::new()
            .name("cgroup-watch".into())
            .spawn(move || watcher.run())
            .context("starting the cgroup watcher")?;
    }
    if let Containment::Degraded(why) = &redirector.containment {
        warn!(reason = %why, "CONTAINMENT DEGRADED: leaving a watched cgroup and bpf() are detected (the job is stopped), not prevented");
    }
    let quarantine = Arc::new(Quarantine::default());
    let guard = Guard::new(
        redirector.clone(),
        store.clone(),
        quarantine.clone(),
        root.clone(),
    );
    std::thread::Builder::new()
        .name("contain-guard".into())
        .spawn(move || guard.run())
        .context("starting the containment guard")?;
    let tls = tls_context(&cfg, &state_dir)?;
    let upstream_tls = upstream_tls(&cfg, &state_dir, tls.as_deref())?;
    let policy = Arc::new(PolicyEngine::load(
        &cfg.policy.trusted_keys,
        &state_dir,
        store.clone(),
        cfg.policy.max_scan_window_bytes,
        cfg.policy.watch_dir.as_deref(),
    )?);
    admin.spawn(policy.clone().watch_expiry());
    // The target list: the policy bundle's when it names targets that
    // this node can serve, otherwise the node configuration's.
    let sink = Arc::new(NodeTargets {
        config: cfg.targets.clone(),
        ca: tls.as_ref().map(|t| t.ca.clone()),
        live: Arc::new(LiveTargets::new(cfg.targets.clone())),
    });
    if let Some(bundle_targets) = policy.current().bundle.targets.clone() {
        match sink.check(&bundle_targets) {
            Ok(()) => sink.live.replace(bundle_targets),
            Err(e) => warn!(error = %e, "policy targets not usable; using the configuration's"),
        }
    }
    targets::install_static(&redirector, &sink.live.list())?;
    if sink
        .live
        .list()
        .iter()
        .any(|t| t.protocol() == crate::config::Protocol::Postgres)
    {
        admin.spawn(crate::postgres::warm());
    }
    let live = sink.live.clone();
    policy.set_target_sink(sink);
    if let Some(dir) = &cfg.policy.watch_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating policy watch directory {}", dir.display()))?;
        admin.spawn(policy.clone().watch(dir.clone()));
    }
    let suspensions = Arc::new(Suspensions::open(&store)?);

    // The evidence spool (and shipping) follow the log on their own.
    let node = cfg
        .ship
        .nats
        .as_ref()
        .and_then(|n| n.node.clone())
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "node".into())
        });
    let spool = if cfg.spool.enabled || cfg.ship.nats.is_some() {
        let node = node.clone();
        let dir = cfg
            .spool
            .dir
            .clone()
            .unwrap_or_else(|| state_dir.join("spool"));
        Some(
            crate::spool::Spool::open(dir, cfg.spool.clone(), node)
                .context("opening the evidence spool")?,
        )
    } else {
        None
    };
    let proxy = Arc::new(Proxy {
        redirector: redirector.clone(),
        identities: IdentityResolver::new(
            root.clone(),
            {
                let r = redirector.clone();
                Arc::new(move || r.cgroups())
            },
            &cfg.workloads,
            &cfg.identity,
        ),
        store: store.clone(),
        targets: live.clone(),
        tls,
        upstream_tls,
        body_cap: cfg.records.body_cap_bytes,
        policy,
        approvals: Arc::new(Approvals::default()),
        suspensions,
        quarantine,
        max_scan_request: cfg.policy.max_request_scan_bytes,
        websocket: cfg.policy.websocket,
        listen: listeners.iter().map(|(a, _)| ProxyAddr(*a)).collect(),
        host_ruled: cfg.watch.host.ruled_targets,
        connect_timeout: Duration::from_secs(cfg.proxy.connect_timeout_secs),
        limits: cfg.proxy.limits.clone(),
        per_identity: Default::default(),
        health: Default::default(),
        counters: Counters::default(),
        metrics: Default::default(),
        spool: spool.as_ref().map(|s| s.status.clone()),
    });
    data_threads(&proxy, listeners)?;
    admin.spawn(targets::maintain(
        redirector.clone(),
        live,
        Duration::from_secs(cfg.dns.refresh_secs),
    ));

    std::thread::Builder::new()
        .name("mem-trim".into())
        .spawn(give_back_memory)
        .context("starting the memory trimmer")?;

    if let Some(sp) = &spool {
        sp.spawn(store.clone())
            .context("starting the spool thread")?;
        if let Some(n) = cfg.ship.nats.clone() {
            admin.spawn(crate::spool::ship::run(sp.clone(), n, store.clone()));
        }
    }
    if let Some(n) = &cfg.ship.nats {
        if let Some(bucket) = n.bundles_bucket.clone() {
            admin.spawn(crate::policy::fleet::watch(
                proxy.policy.clone(),
                crate::spool::ship::Endpoint::from(n),
                bucket,
            ));
        }
    }
    let load_keys = |keys: &[PathBuf], what: &str| {
        keys.iter()
            .map(|k| sluice_fleet::signed::Trusted::load(k))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("loading `{what}`"))
    };
    let console_keys = match &cfg.console {
        Some(c) => load_keys(&c.keys, "console.keys")?,
        None => Vec::new(),
    };
    let mut deciding = load_keys(&cfg.decisions.keys, "decisions.keys")?;
    deciding.extend(console_keys.iter().cloned());
    if deciding.is_empty() {
        warn!("no key may sign decisions (`decisions.keys`, `console.keys`): held requests can only time out into denials, and suspensions are lifted by no one");
    }
    let deciders = Arc::new(crate::decision::Deciders {
        node: node.clone(),
        trusted: deciding,
    });
    let control_listener = {
        let _on = admin.enter();
        control::bind(&socket)?
    };
    let server = Arc::new(ControlServer {
        proxy: proxy.clone(),
        started: Instant::now(),
        cgroup_root: root.clone(),
        local_decisions: cfg.console.as_ref().is_none_or(|c| c.local_decisions),
        deciders: deciders.clone(),
        console: cfg.console.is_some(),
    });
    admin.spawn(server.clone().serve(control_listener));
    if let (Some(c), Some(n), Some(sp)) = (&cfg.console, &cfg.ship.nats, &spool) {
        let trusted = console_keys;
        let status = {
            let server = server.clone();
            Arc::new(move || serde_json::to_value(server.status()).unwrap_or_default())
        };
        admin.spawn(
            Arc::new(crate::console::Link {
                node: sp.node.clone(),
                endpoint: crate::spool::ship::Endpoint::from(n),
                trusted,
                deciders,
                suspensions_bucket: c.suspensions_bucket.clone(),
                local_decisions: c.local_decisions,
                approvals: proxy.approvals.clone(),
                suspensions: proxy.suspensions.clone(),
                store: store.clone(),
                status,
            })
            .run(),
        );
    }
    if let Some(addr) = cfg.metrics.listen {
        let p = proxy.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
            p.metrics
                .render(|m| p.refresh_metrics(m))
                .unwrap_or_default()
        });
        admin.spawn(crate::metrics::serve(addr, render));
    }

    info!(
        cgroups = ?redirector.cgroups(),
        containment = ?redirector.containment,
        port = cfg.proxy.port,
        state_dir = %state_dir.display(),
        socket = %socket.display(),
        "sluice ready"
    );

    shutdown_signal().await;
    info!("shutting down");
    if cfg.watch.fail_closed {
        info!("kernel programs stay attached: watched jobs cannot reach targets until the node is back (`sluice detach` to remove)");
    } else {
        let n = redirect::detach(&node_dir, &redirector.cgroups())?;
        info!(links = n, "kernel programs detached");
    }
    // A last signed checkpoint covers everything recorded, on disk.
    store.seal().await?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// The data path, thread per core (nginx's model): each thread runs a
/// current-thread runtime that accepts from its own handle (`dup`) of the
/// proxy's listening sockets; whichever thread's accept wins keeps the
/// connection. A connection's tasks (client side, upstream side, its
/// record) then wake on one thread and never hop to another: no work
/// stealing, no cross-thread wake-ups per request (the profile's largest
/// cost after TLS). Not `SO_REUSEPORT`: see `proxy::bind`.
fn data_threads(
    proxy: &Arc<Proxy>,
    listeners: Vec<(SocketAddr, tokio::net::TcpListener)>,
) -> anyhow::Result<()> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shared = listeners
        .into_iter()
        .map(|(_, l)| l.into_std())
        .collect::<std::io::Result<Vec<_>>>()
        .context("handing the proxy listeners to the data threads")?;
    for i in 0..n {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a data runtime")?;
        // Registered with this thread's reactor before it starts.
        let own = {
            let _on = rt.enter();
            shared
                .iter()
                .map(|l| l.try_clone().and_then(tokio::net::TcpListener::from_std))
                .collect::<std::io::Result<Vec<_>>>()
                .context("sharing the proxy listeners")?
        };
        let proxy = proxy.clone();
        std::thread::Builder::new()
            .name(format!("sluice-data-{i}"))
            .spawn(move || {
                rt.block_on(async move {
                    for l in own {
                        tokio::spawn(proxy.clone().serve(l));
                    }
                    std::future::pending::<()>().await
                })
            })
            .context("starting a data thread")?;
    }
    Ok(())
}

/// The admin runtime (ztunnel's split): control calls, metrics scrapes,
/// the policy watches, evidence shipping, the console link and DNS
/// refreshes run on a thread of their own, so none of them holds a data
/// worker while connections wait. Blocking work they start (a whole-chain
/// verify, a policy compile) goes to this runtime's blocking pool.
fn admin_runtime() -> anyhow::Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("sluice-admin")
        .build()
        .context("starting the admin runtime")?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("sluice-admin".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .context("starting the admin thread")?;
    Ok(handle)
}

/// Where policy bundles' target lists land: checked against what this node
/// can serve (its CA's name constraints), then swapped in live.
struct NodeTargets {
    config: Vec<Target>,
    ca: Option<Arc<Ca>>,
    live: Arc<LiveTargets>,
}

impl TargetSink for NodeTargets {
    fn check(&self, targets: &[Target]) -> Result<(), String> {
        validate_targets(targets, "targets").map_err(|(f, m)| format!("field `{f}`: {m}"))?;
        for t in targets.iter().filter(|t| t.tls == TlsMode::Intercept) {
            for n in t.names() {
                let name = n.trim_start_matches("*.");
                match &self.ca {
                    Some(ca) if ca.permits(name) => {}
                    Some(_) => {
                        return Err(format!(
                            "target `{}` intercepts `{n}`, outside this node's CA name constraints (add it to the node configuration and rotate with `sluice ca init --force`)",
                            t.name
                        ))
                    }
                    None => return Err(format!("target `{}` intercepts TLS but this node has no CA", t.name)),
                }
            }
        }
        Ok(())
    }

    fn install(&self, targets: Option<Vec<Target>>) {
        self.live
            .replace(targets.unwrap_or_else(|| self.config.clone()));
    }
}

/// The CA (created on first start, constrained to the intercepted names)
/// and the upstream trust roots; none when nothing is intercepted.
fn tls_context(cfg: &Config, state_dir: &Path) -> anyhow::Result<Option<Arc<TlsContext>>> {
    let names = cfg.intercept_names();
    if names.is_empty() {
        return Ok(None);
    }
    let ca = Arc::new(Ca::init(&state_dir.join("ca"), &names, false)?);
    for n in &names {
        if !ca.permits(n.trim_start_matches("*.")) {
            warn!(name = %n, "target name is outside the CA's name constraints; it will not be intercepted until `sluice ca init --force`");
        }
    }
    info!(fingerprint = %ca.fingerprint(), permitted = ?ca.permitted(), "node CA loaded");
    Ok(Some(Arc::new(TlsContext::new(
        ca,
        &cfg.tls.extra_upstream_roots,
    )?)))
}

/// The upstream trust roots for every target that verifies a server: the
/// intercepting context's, or, with nothing intercepted (a Postgres target
/// with `tls: none` still verifies its server), loaded alone, without the
/// node's CA if it has one. A bundle may add such targets later, so the
/// roots are loaded whenever they can be; only a configured target that
/// needs them makes their absence an error.
fn upstream_tls(
    cfg: &Config,
    state_dir: &Path,
    tls: Option<&TlsContext>,
) -> anyhow::Result<Option<Arc<crate::tls::Upstream>>> {
    if let Some(t) = tls {
        return Ok(Some(t.upstream().clone()));
    }
    let own_ca = std::fs::read_to_string(crate::tls::ca::cert_path(&state_dir.join("ca")))
        .ok()
        .and_then(|pem| crate::tls::pem_certs(&pem).into_iter().next());
    match crate::tls::Upstream::load(&cfg.tls.extra_upstream_roots, own_ca.as_ref()) {
        Ok(u) => Ok(Some(Arc::new(u))),
        Err(e) if cfg.targets.iter().any(Target::verifies_server) => {
            Err(anyhow::Error::new(e).context("upstream TLS trust roots"))
        }
        Err(e) => {
            warn!(error = %e, "no upstream trust roots: targets that verify a server will fail");
            Ok(None)
        }
    }
}

/// glibc keeps freed memory in its per-thread arenas: the transient peak
/// of compiling a policy (Hyperscan, regexes) and the buffers of closed
/// connections would stay resident for good. Every few seconds it is
/// handed back to the kernel (`malloc_trim`, which also releases free
/// pages inside the heap), so the node's RSS follows its load back down.
fn give_back_memory() {
    loop {
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// Every intercepted connection holds two descriptors (job side and
/// upstream): the soft limit goes up to the hard one (the unit sets it),
/// as servers do; the per-identity cap keeps one job from taking them all.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain calls with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
            }
        }
    }
}

/// State holds evidence: readable by root only.
fn restrict(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
