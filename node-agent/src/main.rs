//! `sluice`: the node daemon (`sluice run`) and the operator CLI that talks
//! to it over the control socket.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use node_agent::{
    config, control,
    control::{Request, Response},
    daemon, export, policy, record,
    record::{ConnectionRecord, Filter, Outcome},
    tls,
};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Transparent data-path security node for CI runners"
)]
struct Cli {
    /// Control socket of the running node.
    #[arg(long, global = true, env = "SLUICE_SOCKET")]
    socket: Option<PathBuf>,
    /// Decide through the fleet's console instead of this host's socket
    /// (`approvals`, `identities`): its URL, e.g. https://console.example.
    #[arg(long, global = true, env = "SLUICE_CONSOLE")]
    console: Option<String>,
    /// The console API token (`sluice-console token new`), in a file.
    #[arg(long, global = true, env = "SLUICE_CONSOLE_TOKEN_FILE")]
    console_token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node: attach the kernel programs and serve the proxy.
    Run {
        /// Configuration file (default: the embedded example).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Directory for records (overrides the configuration).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Check what this host gives the node: kernel features, cgroups,
    /// targets, the CA and how runtimes trust it, the running node.
    Doctor {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show the running node's state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Recorded sessions.
    Sessions {
        #[command(subcommand)]
        cmd: SessionsCmd,
    },
    /// Remove the pinned kernel programs of the configured cgroups
    /// (interception stops; for uninstalling).
    Detach {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check the record store's hash chain and its signed checkpoints
    /// (whole store or one session), or, with --export, check an exported
    /// session offline against the checkpoint it carries.
    Verify {
        #[arg(long, conflicts_with = "export")]
        session: Option<u64>,
        /// A file from `sessions export` (jsonl or har); no node needed.
        #[arg(long)]
        export: Option<PathBuf>,
        /// A NATS server holding shipped evidence: check a node's chain
        /// from the stream alone (no node needed).
        #[arg(long, conflicts_with_all = ["export", "session"])]
        stream: Option<String>,
        /// The node, as its events' subjects name it.
        #[arg(long, requires = "stream")]
        node: Option<String>,
        #[arg(long, default_value = "SLUICE")]
        stream_name: String,
        #[arg(long, default_value = "sluice.evidence")]
        subject_prefix: String,
        #[command(flatten)]
        nats_auth: NatsAuth,
    },
    /// The node's internal CA.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Signed policy bundles.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Requests held for a human decision.
    Approvals {
        #[command(subcommand)]
        cmd: ApprovalsCmd,
    },
    /// Workload identities: list, suspend, resume.
    Identities {
        #[command(subcommand)]
        cmd: IdentitiesCmd,
    },
    /// Operator keys, which sign approvals, denials and resumes.
    Operator {
        #[command(subcommand)]
        cmd: OperatorCmd,
    },
    /// Node-level audit trail (policy pushes, approvals, suspensions,
    /// refused control calls, `anomaly` events such as forged CI identities).
    Audit {
        /// Only events whose kind starts with this (e.g. `approval`).
        #[arg(long, default_value = "")]
        kind: String,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Create an Ed25519 signing key pair: PREFIX.key (0600) and PREFIX.pub.
    Keygen { prefix: PathBuf },
    /// Sign a bundle (YAML) into a JWS the nodes accept.
    Sign {
        bundle: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Output file (default: BUNDLE with extension .jws).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Push a signed bundle to the running node.
    Push { file: PathBuf },
    /// Roll a signed bundle out to the fleet: every node watching the NATS
    /// key-value bucket applies it (each checks signature and floor).
    Publish {
        file: PathBuf,
        #[arg(long)]
        nats: String,
        #[arg(long, default_value = "SLUICE_BUNDLES")]
        bucket: String,
        #[command(flatten)]
        nats_auth: NatsAuth,
    },
    /// The policy in force.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Run a bundle's rules offline over sample files (or stdin) exactly
    /// as a node would for the chosen shape; print each hit (masked) and
    /// the output. Exit 0 when the expectations hold, 1 when not, 2 when
    /// the bundle or an input cannot be read.
    Test {
        /// The bundle (YAML, as signed).
        bundle: PathBuf,
        /// Sample files; `-` or none: standard input.
        files: Vec<PathBuf>,
        /// What the samples are.
        #[arg(long, value_enum, default_value = "response")]
        on: node_agent::bundle_check::On,
        /// How a response body is framed.
        #[arg(long, value_enum, default_value = "plain")]
        shape: node_agent::bundle_check::Shape,
        /// Characters per streamed delta (`--shape sse`).
        #[arg(long, default_value_t = 5)]
        delta: usize,
        /// Apply the rules for this target only (default: any target).
        #[arg(long)]
        target: Option<String>,
        /// Apply the rules for a job of this bundle workload (default: any).
        #[arg(long)]
        workload: Option<String>,
        /// The hold-back window of the node (`policy.max_scan_window_bytes`).
        #[arg(long, default_value_t = 8192)]
        max_window: usize,
        #[arg(long)]
        json: bool,
        /// Fail unless every sample had something masked.
        #[arg(long)]
        expect_masked: bool,
        /// Fail unless no rule acted on any sample.
        #[arg(long)]
        expect_clean: bool,
        /// Fail unless every sample was blocked.
        #[arg(long)]
        expect_blocked: bool,
        /// Fail unless every sample was held for approval.
        #[arg(long)]
        expect_held: bool,
    },
    /// Report what in a bundle cannot work: it does not compile, patterns
    /// that match the empty string, rules that miss their own `examples`
    /// or are always decided first by an earlier block, unknown targets,
    /// an expiry passed. Exit 1 on errors (and on warnings with --strict).
    Lint {
        bundle: PathBuf,
        #[arg(long, default_value_t = 8192)]
        max_window: usize,
        #[arg(long)]
        strict: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ApprovalsCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    Approve {
        id: u64,
        /// The node holding it (with --console).
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        signing: Signing,
    },
    Deny {
        id: u64,
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        signing: Signing,
    },
}

/// How a decision on this host's socket is signed: the node applies it
/// only under a key in its `decisions.keys` (or the console's).
#[derive(clap::Args)]
struct Signing {
    /// The operator's Ed25519 private key (`sluice operator keygen`).
    #[arg(long, env = "SLUICE_OPERATOR_KEY")]
    key: Option<PathBuf>,
    /// Who decides, as the record names them (default: $SUDO_USER, $USER).
    #[arg(long)]
    by: Option<String>,
}

impl Signing {
    fn signer(&self, op: &str) -> anyhow::Result<(sluice_fleet::signed::Signer, String)> {
        let Some(key) = &self.key else {
            bail!("{op} needs a decision signed by an operator key the node trusts: --key PATH (or SLUICE_OPERATOR_KEY); `sluice operator keygen PREFIX` makes a pair, the node lists PREFIX.pub in `decisions.keys`");
        };
        let signer = sluice_fleet::signed::Signer::load(key)?;
        let by = self
            .by
            .clone()
            .or_else(|| std::env::var("SUDO_USER").ok())
            .or_else(|| std::env::var("USER").ok())
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "operator".into());
        Ok((signer, by))
    }
}

#[derive(Subcommand)]
enum OperatorCmd {
    /// Create an operator's Ed25519 key pair: PREFIX.key (0600) and
    /// PREFIX.pub (for `decisions.keys`). Keep PREFIX.key off the runners.
    Keygen { prefix: PathBuf },
}

#[derive(Subcommand)]
enum IdentitiesCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    Suspend {
        id: String,
        #[arg(long)]
        reason: String,
        /// With --console: what `id` names (identity, repository, actor).
        #[arg(long, default_value = "identity")]
        scope: String,
    },
    Resume {
        id: String,
        #[arg(long, default_value = "identity")]
        scope: String,
        #[command(flatten)]
        signing: Signing,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create the CA (constrained to the configuration's target names).
    Init {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Replace an existing CA (rotation).
        #[arg(long)]
        force: bool,
    },
    /// Print subject, constraints, fingerprint and validity.
    Show {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print the certificate PEM.
        #[arg(long)]
        pem: bool,
    },
    /// Add the CA to the host's system trust store (Debian).
    Install {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Remove it from the system trust store.
    Uninstall {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a configuration file (default: the embedded example).
    Check { file: Option<PathBuf> },
    /// Print the embedded default configuration.
    Default,
}

#[derive(Subcommand)]
enum SessionsCmd {
    /// List sessions, newest first.
    List {
        /// Identity id, workload name, or part of the repository / cgroup.
        #[arg(long)]
        identity: Option<String>,
        #[arg(long)]
        target: Option<String>,
        /// RFC 3339 time or a duration back from now ("15m", "2h").
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show one session and its exchanges in full (JSON).
    Show { id: u64 },
    /// Replay a session's exchanges, in order, as a readable timeline.
    Replay { id: u64 },
    /// Export a session as evidence.
    Export {
        id: u64,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Jsonl,
    Har,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping a cause its parent already quotes
/// (our error types include their source in their message).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

/// `approvals` and `identities` through a console's API: decisions signed
/// there, delivered to the node holding the request.
async fn through_console(
    url: &str,
    token: Option<&std::path::Path>,
    cmd: Cmd,
) -> anyhow::Result<ExitCode> {
    let mut c = node_agent::console_cli::ConsoleClient::new(url, token)?;
    let need_node = |n: Option<String>| n.context("--node names the node holding the request");
    match cmd {
        Cmd::Approvals { cmd } => match cmd {
            ApprovalsCmd::List { json } => {
                let v = c.get("/api/approvals").await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v["held"])?);
                } else {
                    println!(
                        "{:<16}  {:>5}  {:<24}  {:<24}  {:<40}  EXPIRES",
                        "NODE", "ID", "REPOSITORY", "RULE", "REQUEST"
                    );
                    for h in v["held"].as_array().into_iter().flatten() {
                        println!(
                            "{:<16}  {:>5}  {:<24}  {:<24}  {:<40}  {}",
                            h["node"].as_str().unwrap_or(""),
                            h["id"],
                            h["ci"]["repository"].as_str().unwrap_or("-"),
                            h["rule"].as_str().unwrap_or(""),
                            format!(
                                "{} {}{}",
                                h["method"].as_str().unwrap_or(""),
                                h["authority"].as_str().unwrap_or(""),
                                h["path"].as_str().unwrap_or("")
                            ),
                            fmt_ms(h["expires_ms"].as_u64().unwrap_or(0))
                        );
                    }
                }
            }
            ApprovalsCmd::Approve {
                id, node, reason, ..
            } => {
                let node = need_node(node)?;
                let v = c
                    .post(
                        &format!("/api/approvals/{node}/{id}"),
                        serde_json::json!({"verdict": "approve", "reason": reason}),
                    )
                    .await?;
                println!("{}", v["message"].as_str().unwrap_or("approved"));
            }
            ApprovalsCmd::Deny {
                id, node, reason, ..
            } => {
                let node = need_node(node)?;
                let v = c
                    .post(
                        &format!("/api/approvals/{node}/{id}"),
                        serde_json::json!({"verdict": "deny", "reason": reason}),
                    )
                    .await?;
                println!("{}", v["message"].as_str().unwrap_or("denied"));
            }
        },
        Cmd::Identities { cmd } => match cmd {
            IdentitiesCmd::List { json } => {
                let v = c.get("/api/suspensions").await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!(
                        "suspended across the fleet (list version {}):",
                        v["version"]
                    );
                    for e in v["entries"].as_array().into_iter().flatten() {
                        println!(
                            "  {} {}  by {}  since {}: {}",
                            e["scope"].as_str().unwrap_or(""),
                            e["value"].as_str().unwrap_or(""),
                            e["by"].as_str().unwrap_or(""),
                            fmt_ms(e["at_ms"].as_u64().unwrap_or(0)),
                            e["reason"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            IdentitiesCmd::Suspend { id, reason, scope } => {
                let v = c
                    .post(
                        "/api/suspensions",
                        serde_json::json!({"scope": scope, "value": id, "reason": reason}),
                    )
                    .await?;
                println!(
                    "{scope} {id} suspended on every node (list version {})",
                    v["version"]
                );
            }
            IdentitiesCmd::Resume { id, scope, .. } => {
                let v = c
                    .post(
                        "/api/suspensions",
                        serde_json::json!({"scope": scope, "value": id, "resume": true}),
                    )
                    .await?;
                println!("{scope} {id} resumed (list version {})", v["version"]);
            }
        },
        // Only these two are sent here (see `dispatch`).
        _ => bail!("--console takes `approvals` and `identities` only"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = cli.socket.clone();
    let sock = || {
        socket
            .clone()
            .unwrap_or_else(config::default_control_socket)
    };
    if let (Some(url), Cmd::Approvals { .. } | Cmd::Identities { .. }) = (&cli.console, &cli.cmd) {
        return through_console(url, cli.console_token_file.as_deref(), cli.cmd).await;
    }
    match cli.cmd {
        Cmd::Run { config, state_dir } => {
            daemon::run(daemon::RunOptions {
                config,
                state_dir,
                socket,
            })
            .await?;
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => {
            let cfg = config::Config::load(file.as_deref())?;
            println!(
                "configuration ok: {} target(s), {} watched cgroup(s), {} workload selector(s)",
                cfg.targets.len(),
                cfg.watch.cgroups.len(),
                cfg.workloads.len()
            );
        }
        Cmd::Config {
            cmd: ConfigCmd::Default,
        } => print!("{}", config::EMBEDDED_DEFAULT),
        Cmd::Status { json } => {
            let Response::Status(s) = control::call(&sock(), &Request::Status).await? else {
                bail!("unexpected reply to status");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "sluice {} (pid {}), up {}s",
                    s.version, s.pid, s.uptime_secs
                );
                println!("watching:   {}", s.watched_cgroups.join(", "));
                println!("listening:  {}", s.listen.join(", "));
                println!("targets:    {} entr(ies)", s.target_entries.len());
                for t in &s.target_entries {
                    println!("  {t}");
                }
                println!(
                    "connections: {} accepted, {} forwarded, {} refused, {} active, {} upstream failures",
                    s.connections_accepted,
                    s.connections_forwarded,
                    s.connections_refused,
                    s.connections_active,
                    s.upstream_failures
                );
                println!(
                    "kernel:     {} redirected, {} UDP refused, {} foreign-netns refused",
                    s.kernel_redirected, s.kernel_udp_refused, s.kernel_foreign_netns_refused
                );
                println!(
                    "containment: {}; refused: {} raw sockets, {} packet sockets ({} killed), {} cgroup escapes, {} bpf() ({} killed); {} escapes detected",
                    s.containment,
                    s.kernel_raw_sockets_refused,
                    s.kernel_packet_sockets_refused,
                    s.kernel_packet_sockets_killed,
                    s.kernel_cgroup_escapes_refused,
                    s.kernel_bpf_refused,
                    s.kernel_bpf_killed,
                    s.escapes_detected
                );
                println!(
                    "guard:      {} jobs stopped ({} quarantined), {} link sets restored, killed: {} shared-fd clones, {} pidfd_getfd",
                    s.jobs_stopped,
                    s.jobs_quarantined,
                    s.links_restored,
                    s.kernel_shared_files_killed,
                    s.kernel_fd_take_killed
                );
                println!(
                    "records:    {} stored, {} errors",
                    s.records_stored, s.record_errors
                );
                println!("recording:  {}", s.recording);
            }
        }
        Cmd::Sessions {
            cmd:
                SessionsCmd::List {
                    identity,
                    target,
                    since,
                    until,
                    limit,
                    json,
                },
        } => {
            let filter = Filter {
                identity,
                target,
                since_ms: since.as_deref().map(parse_time).transpose()?,
                until_ms: until.as_deref().map(parse_time).transpose()?,
                limit: Some(limit),
            };
            let Response::Sessions { sessions } =
                control::call(&sock(), &Request::SessionsList { filter }).await?
            else {
                bail!("unexpected reply to sessions list");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&sessions)?);
            } else {
                print_sessions(&sessions);
            }
        }
        Cmd::Sessions {
            cmd: SessionsCmd::Show { id },
        } => {
            let (session, exchanges, statements) = fetch_session(&sock(), id).await?;
            let mut v = serde_json::to_value(&session)?;
            v["exchanges"] = serde_json::to_value(&exchanges)?;
            if !statements.is_empty() {
                v["statements"] = serde_json::to_value(&statements)?;
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Cmd::Sessions {
            cmd: SessionsCmd::Replay { id },
        } => {
            let (session, exchanges, statements) = fetch_session(&sock(), id).await?;
            print!("{}", export::replay(&session, &exchanges, &statements));
        }
        Cmd::Sessions {
            cmd: SessionsCmd::Export { id, format },
        } => {
            let (session, exchanges, statements) = fetch_session(&sock(), id).await?;
            let evidence = match control::call(&sock(), &Request::SessionEvidence { id }).await? {
                Response::Evidence { evidence } => evidence,
                _ => bail!("unexpected reply to session evidence"),
            };
            // What the export shows is what the checkpoint proves: the
            // session may have moved on (a response completed, the close)
            // between the read above and the seal.
            let (session, exchanges, statements) =
                proven_records(&evidence).unwrap_or((session, exchanges, statements));
            match format {
                ExportFormat::Jsonl => {
                    print!(
                        "{}",
                        export::jsonl(&session, &exchanges, &statements, &evidence)?
                    )
                }
                ExportFormat::Har => println!(
                    "{}",
                    serde_json::to_string_pretty(&export::har(&session, &exchanges, &evidence))?
                ),
            }
        }
        Cmd::Ca { cmd } => return ca_command(cmd),
        Cmd::Doctor {
            config,
            state_dir,
            json,
        } => {
            let cfg = config::Config::load(config.as_deref())?;
            let state = state_dir.unwrap_or_else(|| cfg.state_dir.clone());
            let mut checks = node_agent::doctor::run(&cfg, &state);
            checks.push(match control::call(&sock(), &Request::Status).await {
                Ok(Response::Status(s)) => node_agent::doctor::Check {
                    level: if s.recording != "ok" {
                        node_agent::doctor::Level::Fail
                    } else if s.containment.starts_with("degraded") {
                        node_agent::doctor::Level::Warn
                    } else {
                        node_agent::doctor::Level::Ok
                    },
                    name: "node".into(),
                    detail: format!(
                        "running (pid {}, policy v{}, recording {}, containment {})",
                        s.pid, s.policy_version, s.recording, s.containment
                    ),
                },
                Ok(_) | Err(_) => node_agent::doctor::Check {
                    level: node_agent::doctor::Level::Warn,
                    name: "node".into(),
                    detail: format!("not reachable on {}", sock().display()),
                },
            });
            let failed = checks
                .iter()
                .any(|c| c.level == node_agent::doctor::Level::Fail);
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for c in &checks {
                    let tag = match c.level {
                        node_agent::doctor::Level::Ok => "ok  ",
                        node_agent::doctor::Level::Warn => "warn",
                        node_agent::doctor::Level::Fail => "FAIL",
                    };
                    println!("{tag}  {:<20} {}", c.name, c.detail);
                }
            }
            return Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        Cmd::Detach { config } => {
            let cfg = config::Config::load(config.as_deref())?;
            let root = node_agent::redirect::cgroup2_root()?;
            let configured: Vec<PathBuf> = cfg
                .watch
                .cgroups
                .iter()
                .map(|c| node_agent::redirect::cgroup_path(&root, &c.path))
                .collect();
            let patterns: Vec<_> = cfg
                .watch
                .patterns
                .iter()
                .filter_map(|p| node_agent::config::CgroupPattern::parse(p).ok())
                .collect();
            let mut cgroups = configured.clone();
            cgroups.extend(node_agent::watch::matching_cgroups(&root, &patterns));
            let node_dir = node_agent::redirect::node_pin_dir(&configured, &cfg.watch.patterns);
            let n = node_agent::redirect::detach(&node_dir, &cgroups)?;
            println!("detached {n} link(s) from {} cgroup(s)", cgroups.len());
        }
        Cmd::Policy { cmd } => return policy_command(cmd, &sock()).await,
        Cmd::Approvals { cmd } => match cmd {
            ApprovalsCmd::List { json } => {
                let Response::Approvals { pending } =
                    control::call(&sock(), &Request::ApprovalsList).await?
                else {
                    bail!("unexpected reply to approvals list");
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&pending)?);
                } else {
                    println!(
                        "{:>5}  {:<20}  {:<28}  {:<8}  {:<40}  EXPIRES",
                        "ID", "IDENTITY", "RULE", "METHOD", "URL"
                    );
                    for p in pending {
                        println!(
                            "{:>5}  {:<20}  {:<28}  {:<8}  {:<40}  {}",
                            p.id,
                            p.workload,
                            p.rule,
                            p.method,
                            format!("https://{}{}", p.authority, p.path),
                            fmt_ms(p.expires_ms)
                        );
                        println!(
                            "       {}",
                            p.preview
                                .chars()
                                .take(160)
                                .collect::<String>()
                                .replace('\n', " ")
                        );
                    }
                }
            }
            ApprovalsCmd::Approve {
                id,
                reason,
                signing,
                ..
            } => {
                let signed = sign_decision(&sock(), &signing, id, true, &reason).await?;
                let req = Request::ApprovalDecide {
                    id,
                    approve: true,
                    reason: None,
                    signed: Some(signed),
                };
                let Response::Decided { approval } = control::call(&sock(), &req).await? else {
                    bail!("unexpected reply");
                };
                println!(
                    "approved {} ({} {} for {})",
                    approval.id, approval.method, approval.path, approval.workload
                );
            }
            ApprovalsCmd::Deny {
                id,
                reason,
                signing,
                ..
            } => {
                let signed = sign_decision(&sock(), &signing, id, false, &reason).await?;
                let req = Request::ApprovalDecide {
                    id,
                    approve: false,
                    reason: Some(reason),
                    signed: Some(signed),
                };
                let Response::Decided { approval } = control::call(&sock(), &req).await? else {
                    bail!("unexpected reply");
                };
                println!(
                    "denied {} ({} {} for {})",
                    approval.id, approval.method, approval.path, approval.workload
                );
            }
        },
        Cmd::Identities { cmd } => match cmd {
            IdentitiesCmd::List { json } => {
                let Response::Identities { suspended, recent } =
                    control::call(&sock(), &Request::IdentitiesList).await?
                else {
                    bail!("unexpected reply");
                };
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"suspended": suspended, "recent": recent})
                    );
                } else {
                    for r in recent {
                        let s = suspended.iter().find(|s| s.identity == r.id);
                        println!(
                            "{:<20}  {:>5} session(s)  last {}  {}{}",
                            r.id,
                            r.sessions,
                            fmt_ms(r.last_seen_ms),
                            r.description,
                            s.map(|s| format!("  SUSPENDED: {}", s.reason))
                                .unwrap_or_default()
                        );
                    }
                }
            }
            IdentitiesCmd::Suspend { id, reason, .. } => {
                let req = Request::IdentitySuspend {
                    identity: id,
                    reason,
                };
                let Response::Suspended {
                    suspension,
                    denied_held,
                } = control::call(&sock(), &req).await?
                else {
                    bail!("unexpected reply");
                };
                println!(
                    "suspended {} ({}); {} held request(s) denied",
                    suspension.identity, suspension.reason, denied_held
                );
            }
            IdentitiesCmd::Resume { id, signing, .. } => {
                let signed = sign_resume(&sock(), &signing, &id).await?;
                let req = Request::IdentityResume {
                    identity: id,
                    signed: Some(signed),
                };
                let Response::Resumed {
                    identity,
                    was_suspended,
                } = control::call(&sock(), &req).await?
                else {
                    bail!("unexpected reply");
                };
                if was_suspended {
                    println!("resumed {identity}");
                } else {
                    println!("{identity} was not suspended");
                }
            }
        },
        Cmd::Operator {
            cmd: OperatorCmd::Keygen { prefix },
        } => {
            let kid = sluice_fleet::keys::keygen(&prefix)?;
            println!(
                "operator key {kid}: {} (private, keep it off the runners) and {} (list it in the nodes' `decisions.keys`)",
                prefix.with_extension("key").display(),
                prefix.with_extension("pub").display()
            );
        }
        Cmd::Audit { kind } => {
            let Response::Audit { events } =
                control::call(&sock(), &Request::Audit { kind }).await?
            else {
                bail!("unexpected reply");
            };
            for e in events {
                println!(
                    "{}  #{:<6} {:<20} {}",
                    fmt_ms(e.at_ms),
                    e.seq,
                    e.kind,
                    e.body
                );
            }
        }
        Cmd::Verify {
            export: Some(file), ..
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let evidence = export::evidence_of(&text).with_context(|| {
                format!("{}: no evidence (export from this version)", file.display())
            })?;
            // The proof first, then that the file shows what it proves.
            match evidence
                .verify()
                .and_then(|own| Ok((own, sluice_evidence::shown::check(&text, &evidence)?)))
            {
                Ok((own, shown)) => {
                    let cp = evidence.checkpoint.as_ref().map(|c| (c.n, c.seq));
                    println!(
                        "ok: {own} event(s) of the session lead to signed checkpoint #{} (event {}), node key {} ({})",
                        cp.map(|c| c.0).unwrap_or_default(),
                        cp.map(|c| c.1).unwrap_or_default(),
                        evidence.node_key.kid,
                        evidence.node_key.ed25519
                    );
                    println!("ok: the {shown} record(s) the file shows are the proven events");
                }
                Err(e) => {
                    println!("BROKEN: {e}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
        Cmd::Verify {
            stream: Some(url),
            node,
            stream_name,
            subject_prefix,
            nats_auth,
            ..
        } => {
            let node = node.context("--node names the node whose chain to check")?;
            let r = node_agent::spool::ship::verify_stream(
                &nats_auth.endpoint(url),
                &stream_name,
                &subject_prefix,
                &node,
            )
            .await?;
            match r.first_break {
                None => println!(
                    "ok: {} event(s) of node {node} in stream {stream_name} (seq {}..{}), chain intact, {} signed checkpoint(s) hold, {} duplicate message(s)",
                    r.events,
                    r.first_seq,
                    r.last_seq,
                    r.checkpoints,
                    r.duplicates
                ),
                Some(b) => {
                    println!("BROKEN: {b}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
        Cmd::Verify { session, .. } => {
            match control::call(&sock(), &Request::Verify { session }).await? {
                Response::Verified { events } => println!("ok: {events} events, chain intact"),
                Response::Broken { first_break } => {
                    println!("BROKEN: {first_break}");
                    return Ok(ExitCode::from(2));
                }
                _ => bail!("unexpected reply to verify"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// TLS roots and a user for a NATS server (as in `ship.nats`).
#[derive(clap::Args, Debug)]
struct NatsAuth {
    /// PEM roots for the server's certificate (TLS then required).
    #[arg(long)]
    nats_ca: Option<PathBuf>,
    #[arg(long, requires = "nats_password_file")]
    nats_user: Option<String>,
    #[arg(long)]
    nats_password_file: Option<PathBuf>,
}

impl NatsAuth {
    fn endpoint(self, url: String) -> node_agent::spool::ship::Endpoint {
        node_agent::spool::ship::Endpoint {
            url,
            tls_ca: self.nats_ca,
            user: self.nats_user,
            password_file: self.nats_password_file,
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The node's name, which a signed decision must carry.
async fn node_name(socket: &std::path::Path) -> anyhow::Result<String> {
    let Response::Status(st) = control::call(socket, &Request::Status).await? else {
        bail!("unexpected reply");
    };
    Ok(st.node)
}

/// Signs an approve or deny of held request `id` for the node behind
/// `socket` (its name and the hold token are read from it first).
async fn sign_decision(
    socket: &std::path::Path,
    signing: &Signing,
    id: u64,
    approve: bool,
    reason: &str,
) -> anyhow::Result<String> {
    let (signer, by) = signing.signer(if approve { "approve" } else { "deny" })?;
    let Response::Approvals { pending } = control::call(socket, &Request::ApprovalsList).await?
    else {
        bail!("unexpected reply");
    };
    let Some(held) = pending.into_iter().find(|p| p.id == id) else {
        bail!("no pending approval {id} (decided, expired or never existed)");
    };
    let iat = unix_now();
    let decision = sluice_fleet::approval::Decision {
        node: node_name(socket).await?,
        id,
        hold: held.hold,
        verdict: if approve {
            sluice_fleet::approval::Verdict::Approve
        } else {
            sluice_fleet::approval::Verdict::Deny
        },
        by,
        reason: reason.to_owned(),
        iat,
        exp: iat + sluice_fleet::approval::DECISION_TTL_SECS,
    };
    Ok(signer.sign(sluice_fleet::approval::DECISION_TYP, &decision)?)
}

/// Signs the resume of the node's own suspension of `identity`.
async fn sign_resume(
    socket: &std::path::Path,
    signing: &Signing,
    identity: &str,
) -> anyhow::Result<String> {
    let (signer, by) = signing.signer("resume")?;
    let Response::Identities { suspended, .. } =
        control::call(socket, &Request::IdentitiesList).await?
    else {
        bail!("unexpected reply");
    };
    let Some(s) = suspended.into_iter().find(|s| s.identity == identity) else {
        bail!("{identity} is not suspended on this node");
    };
    let iat = unix_now();
    let resume = sluice_fleet::suspension::Resume {
        node: node_name(socket).await?,
        identity: identity.to_owned(),
        suspended_at_ms: s.at_ms,
        by,
        iat,
        exp: iat + sluice_fleet::approval::DECISION_TTL_SECS,
    };
    Ok(signer.sign(sluice_fleet::suspension::RESUME_TYP, &resume)?)
}

/// The session's records as the evidence proves them (`None` when it
/// holds no connection record).
fn proven_records(
    evidence: &node_agent::record::Evidence,
) -> Option<(
    ConnectionRecord,
    Vec<record::Exchange>,
    Vec<record::Statement>,
)> {
    let p = sluice_evidence::shown::proven(evidence);
    let session = serde_json::from_value(p.session).ok()?;
    let exchanges = p
        .exchanges
        .into_values()
        .map(serde_json::from_value)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let statements = p
        .statements
        .into_values()
        .map(serde_json::from_value)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some((session, exchanges, statements))
}

async fn fetch_session(
    socket: &std::path::Path,
    id: u64,
) -> anyhow::Result<(
    ConnectionRecord,
    Vec<record::Exchange>,
    Vec<record::Statement>,
)> {
    match control::call(socket, &Request::SessionsShow { id }).await? {
        Response::Session {
            session,
            exchanges,
            statements,
        } => Ok((*session, exchanges, statements)),
        _ => bail!("unexpected reply to sessions show"),
    }
}

fn ca_dir(
    config: Option<&std::path::Path>,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<(config::Config, PathBuf)> {
    let cfg = config::Config::load(config)?;
    let dir = state_dir
        .unwrap_or_else(|| cfg.state_dir.clone())
        .join("ca");
    Ok((cfg, dir))
}

fn ca_command(cmd: CaCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CaCmd::Init {
            config,
            state_dir,
            force,
        } => {
            let (cfg, dir) = ca_dir(config.as_deref(), state_dir)?;
            let existed = tls::ca::cert_path(&dir).exists();
            let ca = tls::Ca::init(&dir, &cfg.intercept_names(), force)?;
            if existed && !force {
                println!(
                    "CA already exists (use --force to rotate): {}",
                    dir.display()
                );
            } else {
                println!("created CA in {}", dir.display());
            }
            println!("permitted names: {}", ca.permitted().join(", "));
            println!("sha256 fingerprint: {}", ca.fingerprint());
        }
        CaCmd::Show {
            config,
            state_dir,
            pem,
        } => {
            let (_, dir) = ca_dir(config.as_deref(), state_dir)?;
            let ca = tls::Ca::load(&dir)?;
            if pem {
                print!("{}", ca.cert_pem());
                return Ok(ExitCode::SUCCESS);
            }
            for (k, v) in tls::ca::describe(ca.cert_der()).map_err(anyhow::Error::msg)? {
                println!("{k:>20}: {v}");
            }
            println!(
                "{:>20}: {}",
                "certificate",
                tls::ca::cert_path(&dir).display()
            );
        }
        CaCmd::Install { config, state_dir } => {
            let (_, dir) = ca_dir(config.as_deref(), state_dir)?;
            let ca = tls::Ca::load(&dir)?;
            let dest = tls::ca::system_store_path(&ca.fingerprint());
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&dest, ca.cert_pem())
                .with_context(|| format!("writing {}", dest.display()))?;
            update_ca_certificates()?;
            println!("installed {} into the system trust store", dest.display());
            println!("runtimes with their own trust store:");
            println!("  Node.js:        NODE_EXTRA_CA_CERTS={}", dest.display());
            println!("  Python certifi: REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt (or SSL_CERT_FILE)");
            println!(
                "  Java:           keytool -importcert -noprompt -cacerts -storepass changeit -alias sluice -file {}",
                dest.display()
            );
        }
        CaCmd::Uninstall { config, state_dir } => {
            let (_, dir) = ca_dir(config.as_deref(), state_dir)?;
            let ca = tls::Ca::load(&dir)?;
            let dest = tls::ca::system_store_path(&ca.fingerprint());
            match std::fs::remove_file(&dest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("not installed ({} absent)", dest.display());
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => return Err(e).with_context(|| format!("removing {}", dest.display())),
            }
            update_ca_certificates()?;
            println!("removed {} from the system trust store", dest.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A bundle as written: YAML, or the payload of a signed JWS (its
/// signature is the node's business, not the test's).
fn read_bundle(path: &std::path::Path) -> anyhow::Result<String> {
    use base64::Engine;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let t = text.trim();
    let parts: Vec<&str> = t.split('.').collect();
    if parts.len() == 3 && !t.contains(char::is_whitespace) {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .with_context(|| format!("{}: not a JWS", path.display()))?;
        return String::from_utf8(payload).context("the JWS payload is not UTF-8");
    }
    Ok(text)
}

fn policy_test(
    bundle: &std::path::Path,
    files: &[PathBuf],
    o: &node_agent::bundle_check::Options,
    max_window: usize,
    json: bool,
    expect: [bool; 4],
) -> anyhow::Result<ExitCode> {
    use node_agent::bundle_check;
    let text = read_bundle(bundle)?;
    let policy = match policy::CompiledPolicy::compile_offline(&text, max_window) {
        Ok(p) => std::sync::Arc::new(p),
        Err(e) => {
            eprintln!("{}: {e}", bundle.display());
            return Ok(ExitCode::from(2));
        }
    };
    let stdin = [PathBuf::from("-")];
    let files = if files.is_empty() { &stdin[..] } else { files };
    let [masked, clean, blocked, held] = expect;
    let mut failed = Vec::new();
    let mut outcomes = Vec::new();
    for f in files {
        let (name, input) = if f.as_os_str() == "-" {
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
            ("-".to_owned(), b)
        } else {
            match std::fs::read(f) {
                Ok(b) => (f.display().to_string(), b),
                Err(e) => {
                    eprintln!("{}: {e}", f.display());
                    return Ok(ExitCode::from(2));
                }
            }
        };
        let out = match bundle_check::test(&policy, &name, &input, o) {
            Ok(out) => out,
            Err(e) => {
                eprintln!("{name}: {e}");
                return Ok(ExitCode::from(2));
            }
        };
        for (want, got, what) in [
            (masked, out.masked_any(), "nothing was masked"),
            (clean, out.clean(), "a rule acted on it"),
            (blocked, out.blocked(), "it was not blocked"),
            (held, out.held(), "it was not held for approval"),
        ] {
            if want && !got {
                failed.push(format!("{name}: {what}"));
            }
        }
        if !json {
            print_outcome(&out);
        }
        outcomes.push(out);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    }
    for f in &failed {
        eprintln!("expectation failed: {f}");
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_outcome(o: &node_agent::bundle_check::Outcome) {
    println!("== {}", o.name);
    for h in &o.hits {
        println!(
            "hit   {}/{}  {}..{}  {}",
            h.rule, h.pattern, h.start, h.end, h.preview
        );
    }
    if let Some(v) = &o.verdict {
        match (&o.rule, &o.message) {
            (Some(r), Some(m)) => println!("verdict: {v} by rule `{r}`: {m}"),
            _ => println!("verdict: {v}"),
        }
    }
    for d in &o.decisions {
        let action = serde_json::to_value(d.action).unwrap_or_default();
        println!(
            "decision: {} {} [{}]",
            d.rule,
            action.as_str().unwrap_or("?"),
            d.patterns.join(", ")
        );
    }
    for m in &o.masked {
        println!("masked {}/{} x{}", m.rule, m.pattern, m.count);
    }
    if let Some(out) = &o.output {
        println!("--- output");
        println!("{out}");
    }
}

fn policy_lint(
    bundle: &std::path::Path,
    max_window: usize,
    strict: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use node_agent::bundle_check::{lint, Severity};
    let text = read_bundle(bundle)?;
    let findings = lint(&text, max_window);
    if json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        for f in &findings {
            let sev = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            println!("{sev}: {}: {}", f.at, f.message);
        }
        if findings.is_empty() {
            println!("{}: no findings", bundle.display());
        }
    }
    let fail = findings
        .iter()
        .any(|f| f.severity == Severity::Error || strict);
    Ok(if fail {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn policy_command(cmd: PolicyCmd, socket: &std::path::Path) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCmd::Test {
            bundle,
            files,
            on,
            shape,
            delta,
            target,
            workload,
            max_window,
            json,
            expect_masked,
            expect_clean,
            expect_blocked,
            expect_held,
        } => {
            let o = node_agent::bundle_check::Options {
                on,
                shape,
                delta,
                target,
                workload,
            };
            return policy_test(
                &bundle,
                &files,
                &o,
                max_window,
                json,
                [expect_masked, expect_clean, expect_blocked, expect_held],
            );
        }
        PolicyCmd::Lint {
            bundle,
            max_window,
            strict,
            json,
        } => return policy_lint(&bundle, max_window, strict, json),
        PolicyCmd::Keygen { prefix } => {
            let kid = policy::sign::keygen(&prefix)?;
            println!(
                "wrote {} (private, 0600) and {}",
                prefix.with_extension("key").display(),
                prefix.with_extension("pub").display()
            );
            println!("key id: {kid}  (list the .pub under policy.trusted_keys on nodes)");
        }
        PolicyCmd::Sign { bundle, key, out } => {
            let text = std::fs::read_to_string(&bundle)
                .with_context(|| format!("reading {}", bundle.display()))?;
            // Parse locally so a broken bundle is caught before it is signed.
            let b: policy::bundle::Bundle = serde_yaml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("bundle {} does not parse: {e}", bundle.display()))?;
            let jws = policy::sign::sign(&text, b.version, &b.name, &key)?;
            let out = out.unwrap_or_else(|| bundle.with_extension("jws"));
            std::fs::write(&out, &jws).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "signed {} version {} -> {}",
                b.name,
                b.version,
                out.display()
            );
        }
        PolicyCmd::Publish {
            file,
            nats,
            bucket,
            nats_auth,
        } => {
            let jws = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Refuse what no node would take: it must at least be signed.
            policy::sign::verify_unsigned_shape(&jws)?;
            let rev = policy::fleet::publish(&nats_auth.endpoint(nats), &bucket, &jws).await?;
            println!(
                "published {} to {bucket}/{} (revision {rev})",
                file.display(),
                policy::fleet::KEY
            );
        }
        PolicyCmd::Push { file } => {
            let jws = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let Response::Policy(p) = control::call(socket, &Request::PolicyPush { jws }).await?
            else {
                bail!("unexpected reply to policy push");
            };
            println!(
                "policy {} version {} in force (signer {})",
                p.name, p.version, p.signer
            );
        }
        PolicyCmd::Show { json } => {
            let Response::Policy(p) = control::call(socket, &Request::PolicyShow).await? else {
                bail!("unexpected reply to policy show");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                println!("policy:   {} version {}", p.name, p.version);
                println!("signer:   {}", p.signer);
                println!("digest:   sha256:{}", p.digest);
                println!("floor:    version {} (nothing older is accepted)", p.floor);
                if let Some(t) = &p.expires_at {
                    println!(
                        "expires:  {t}{}",
                        if p.expired {
                            "  EXPIRED: push a fresh bundle; the node will not start on this one"
                        } else {
                            ""
                        }
                    );
                }
                println!(
                    "window:   {} bytes held back on masked streams",
                    p.response_window_bytes
                );
                println!("credentials injected for: {}", p.credentials_for.join(", "));
                println!("rules:");
                for r in p.rules {
                    println!("  {r}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn update_ca_certificates() -> anyhow::Result<()> {
    // Not --fresh: rebuilding every link races with other users of the store.
    let out = std::process::Command::new("update-ca-certificates")
        .output()
        .context("running update-ca-certificates (package ca-certificates)")?;
    if !out.status.success() {
        bail!(
            "update-ca-certificates failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// RFC 3339, or a duration back from now.
fn parse_time(s: &str) -> anyhow::Result<u64> {
    if let Ok(d) = humantime::parse_duration(s) {
        let t = SystemTime::now()
            .checked_sub(d)
            .context("duration reaches before the epoch")?;
        return Ok(t.duration_since(UNIX_EPOCH)?.as_millis() as u64);
    }
    let t = humantime::parse_rfc3339_weak(s)
        .with_context(|| format!("`{s}` is neither an RFC 3339 time nor a duration"))?;
    Ok(t.duration_since(UNIX_EPOCH)?.as_millis() as u64)
}

fn fmt_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn print_sessions(sessions: &[ConnectionRecord]) {
    println!(
        "{:>8}  {:<24}  {:<20}  {:<14}  {:<22}  {:>7}  {:<16}  {:>9} {:>9}  OUTCOME",
        "ID", "STARTED", "IDENTITY", "TARGET", "DESTINATION", "PID", "COMM", "UP", "DOWN"
    );
    for s in sessions {
        let who = s
            .identity
            .ci
            .as_ref()
            .and_then(|c| c.repository.clone())
            .unwrap_or_else(|| s.identity.id.clone());
        let outcome = match &s.outcome {
            Outcome::Open => "open".to_string(),
            Outcome::Closed => "closed".to_string(),
            Outcome::Interrupted => "interrupted".to_string(),
            Outcome::Refused { reason, .. } => format!("refused: {reason}"),
            Outcome::UpstreamFailed { error } => format!("upstream failed: {error}"),
            Outcome::Failed { error } => format!("failed: {error}"),
        };
        println!(
            "{:>8}  {:<24}  {:<20}  {:<14}  {:<22}  {:>7}  {:<16}  {:>9} {:>9}  {}",
            s.id,
            fmt_ms(s.started_at_ms),
            who,
            s.target.as_deref().unwrap_or("-"),
            s.original_dst
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into()),
            s.process.tgid,
            s.process.comm,
            s.bytes_up,
            s.bytes_down,
            outcome
        );
    }
}
