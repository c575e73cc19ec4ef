//! `sluice-console`: the fleet's evidence in one place. It follows the
//! nodes' evidence stream on NATS JetStream, verifies each node's chain,
//! keeps everything in its store (an embedded SQLite file by default) and
//! serves the web UI and its JSON API.
use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};

mod auth;
mod bench;
mod export;
mod fleet;
mod ingest;
mod notify;
mod pages;
mod store;
mod web;

#[derive(Parser)]
#[command(name = "sluice-console", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start-up: the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Ingest the evidence stream and serve the UI.
    Run {
        /// NATS server the nodes ship to.
        #[arg(
            long,
            env = "SLUICE_CONSOLE_NATS",
            default_value = "nats://127.0.0.1:4222"
        )]
        nats: String,
        /// JetStream stream of the evidence (the nodes' `ship.nats.stream`).
        #[arg(long, default_value = "SLUICE")]
        stream: String,
        /// The nodes' `ship.nats.subject_prefix`.
        #[arg(long, default_value = "sluice.evidence")]
        subject_prefix: String,
        /// Durable consumer name; replicas sharing it share the work.
        #[arg(long, default_value = "sluice-console")]
        durable: String,
        /// Where the embedded store lives.
        #[arg(long, default_value = "/var/lib/sluice-console")]
        state_dir: PathBuf,
        /// The store: a PostgreSQL URL (`postgres://user@host/db`), or
        /// unset for the SQLite file `console.db` in --state-dir. Its
        /// value is never shown (it may carry a password).
        #[arg(long, env = "SLUICE_CONSOLE_STORE", hide_env_values = true)]
        store: Option<String>,
        /// Address of the web UI. Without a login (--oidc-issuer) only a
        /// loopback address is accepted.
        #[arg(long, default_value = "127.0.0.1:8470")]
        listen: std::net::SocketAddr,
        /// Sessions older than this many days are forgotten (checked
        /// hourly); 0 keeps everything.
        #[arg(long, default_value_t = 90)]
        retain_days: u64,
        /// Key-value bucket of the fleet's signed suspension list (the
        /// nodes' `console.suspensions_bucket`).
        #[arg(long, default_value = sluice_fleet::subjects::SUSPENSIONS_BUCKET)]
        suspensions_bucket: String,
        /// Key-value bucket of the fleet's signed bundle (the nodes'
        /// `ship.nats.bundles_bucket`).
        #[arg(long, default_value = "SLUICE_BUNDLES")]
        bundles_bucket: String,
        #[command(flatten)]
        auth: auth::AuthArgs,
        #[command(flatten)]
        notify: notify::NotifyArgs,
    },
    /// API tokens for automation.
    Token {
        #[command(subcommand)]
        cmd: auth::TokenCmd,
    },
    /// The store under generated evidence (`cargo xtask bench console`):
    /// ingest rate and search latency; prints JSON.
    #[command(hide = true)]
    Bench {
        /// The store (default: a SQLite file in a temporary directory).
        #[arg(long)]
        store: Option<String>,
        #[arg(long, default_value_t = 1_000_000)]
        exchanges: u64,
        #[arg(long, default_value_t = 50)]
        per_session: u64,
    },
    /// Enroll a node's checkpoint key (its `node-signing.pub`, in the
    /// node's state directory): the console then trusts that key only,
    /// instead of the first it sees.
    Enroll {
        /// The node's name in subjects (`ship.nats.node`).
        #[arg(long)]
        node: String,
        /// The node's public key file (PEM).
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value = "/var/lib/sluice-console")]
        state_dir: PathBuf,
        #[arg(long, env = "SLUICE_CONSOLE_STORE", hide_env_values = true)]
        store: Option<String>,
    },
    /// Print the console's decision-signing public key (PEM), made on
    /// first use: list it in each node's `console.keys`.
    Key {
        #[arg(long, default_value = "/var/lib/sluice-console")]
        state_dir: PathBuf,
    },
}

/// The decision-signing key in the state directory (made on first use).
fn signer(state_dir: &std::path::Path) -> anyhow::Result<sluice_fleet::signed::Signer> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("state directory {}", state_dir.display()))?;
    sluice_fleet::signed::Signer::load_or_create(&state_dir.join("console-signing"))
        .context("the console's signing key")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().cmd {
        Cmd::Run {
            nats,
            stream,
            subject_prefix,
            durable,
            state_dir,
            store: location,
            listen,
            retain_days,
            suspensions_bucket,
            bundles_bucket,
            auth,
            notify,
        } => {
            let auth = Arc::new(auth::Auth::from_args(auth)?);
            let notifier = notify::Notifier::start(notify::Config::from_args(notify, &listen)?);
            let signer = signer(&state_dir)?;
            // Connecting and migrating block: off the runtime.
            let file = state_dir.join("console.db");
            let store = tokio::task::spawn_blocking(move || {
                store::Store::open_location(location.as_deref(), &file)
            })
            .await
            .context("opening the store")?
            .context("opening the store")?;
            tracing::info!(backend = store.backend(), "store open");
            let store = Arc::new(store);
            tracing::info!(kid = %signer.kid, "decisions are signed with this key (`sluice-console key` prints it)");
            let fleet = Arc::new(fleet::Fleet::new(
                signer,
                suspensions_bucket,
                notifier.clone(),
            )?);
            tokio::spawn(fleet.clone().run(nats.clone()));
            tokio::spawn(ingest::run(
                store.clone(),
                notifier,
                ingest::Source {
                    url: nats,
                    stream,
                    subject_prefix,
                    durable,
                },
            ));
            if retain_days > 0 {
                tokio::spawn(retention(store.clone(), retain_days));
            }
            tokio::spawn({
                let auth = auth.clone();
                async move { auth.probe().await }
            });
            if !auth.allows_listen(&listen) {
                anyhow::bail!(
                    "{listen} is not a loopback address: without a login configured the console serves loopback only"
                );
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            tracing::info!(%listen, "console serving");
            axum::serve(
                listener,
                web::router(web::App {
                    store,
                    auth,
                    fleet,
                    bundles_bucket: Arc::from(bundles_bucket.as_str()),
                }),
            )
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")?;
        }
        Cmd::Bench {
            store,
            exchanges,
            per_session,
        } => {
            let dir =
                std::env::temp_dir().join(format!("sluice-console-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir).context("bench directory")?;
            let file = dir.join("console.db");
            let report = tokio::task::spawn_blocking(move || {
                let st = store::Store::open_location(store.as_deref(), &file)?;
                bench::run(&st, exchanges, per_session)
            })
            .await
            .context("bench task")?
            .context("bench")?;
            let _ = std::fs::remove_dir_all(&dir);
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Cmd::Enroll {
            node,
            key,
            state_dir,
            store,
        } => {
            let text = std::fs::read_to_string(&key)
                .with_context(|| format!("node key {}", key.display()))?;
            let raw = sluice_fleet::keys::public_raw_from_pem(&text)
                .map_err(|e| anyhow::anyhow!("node key {}: {e}", key.display()))?;
            let k = store::NodeKey {
                kid: sluice_fleet::keys::kid_of(&raw),
                ed25519: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &raw),
                source: "enrolled".into(),
                at_ms: fleet::now_ms(),
            };
            let file = state_dir.join("console.db");
            let kid = k.kid.clone();
            let n = node.clone();
            tokio::task::spawn_blocking(move || {
                store::Store::open_location(store.as_deref(), &file)?.enroll_key(&n, &k)
            })
            .await
            .context("enroll task")?
            .context("enrolling the key")?;
            println!("node {node}: key {kid} enrolled");
        }
        Cmd::Key { state_dir } => print!("{}", signer(&state_dir)?.public_pem()),
        Cmd::Token { cmd } => auth::run_token(cmd)?,
    }
    Ok(())
}

/// Forgets sessions past the retention age, hourly, off the runtime.
async fn retention(store: Arc<store::Store>, days: u64) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let cutoff = now.saturating_sub(days.saturating_mul(86_400_000));
        let st = store.clone();
        match tokio::task::spawn_blocking(move || st.retain(cutoff)).await {
            Ok(Ok(n)) if n > 0 => {
                tracing::info!(sessions = n, days, "retention: sessions forgotten")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "retention failed"),
            Err(e) => tracing::warn!(error = %e, "retention task failed"),
        }
    }
}
