//! Node configuration: what to watch, what to intercept, where to keep
//! state. YAML, strict (unknown fields are errors), validated before any
//! kernel state is touched so a bad file never half-applies.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The example configuration shipped in `policies/`, embedded so that
/// `sluice run` works with no file at all.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../policies/sluice.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid configuration {origin}: field `{field}`: {message}")]
    Invalid {
        origin: String,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where sled keeps records. `--state-dir` overrides it.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Control API socket (root only). Default `/run/sluice/control.sock`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    #[serde(default)]
    pub proxy: ProxyConfig,
    pub watch: WatchConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub targets: Vec<Target>,
    #[serde(default)]
    pub workloads: Vec<WorkloadSelector>,
    #[serde(default)]
    pub tls: TlsSettings,
    #[serde(default)]
    pub records: RecordSettings,
    #[serde(default)]
    pub policy: PolicySettings,
    #[serde(default)]
    pub identity: IdentitySettings,
    #[serde(default)]
    pub metrics: MetricsSettings,
    #[serde(default)]
    pub spool: SpoolSettings,
    #[serde(default)]
    pub ship: ShipSettings,
    /// Following a console (over `ship.nats`): held approvals announced,
    /// signed decisions and the fleet's suspension list accepted,
    /// heartbeats sent. `null`: no console.
    #[serde(default)]
    pub console: Option<ConsoleSettings>,
    #[serde(default)]
    pub decisions: DecisionSettings,
}

/// Who may approve, deny and resume on this node: a decision counts only
/// when signed by one of these keys (or by the console's, `console.keys`).
/// Being root on the host is not enough: a root job reaches the control
/// socket through any host daemon that runs commands for it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionSettings {
    /// Operators' Ed25519 public keys (PEM; `sluice operator keygen`
    /// makes a pair). Keep the private keys off the runners.
    #[serde(default)]
    pub keys: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    /// The console's decision-signing public keys (PEM; `sluice-console
    /// key` prints one). Decisions and suspension lists signed by any
    /// other key are refused.
    pub keys: Vec<PathBuf>,
    /// Whether the control socket still takes the deciding calls
    /// (approve, deny, resume, push). Off: decisions come signed from
    /// the console, so a root job that reaches the socket through a host
    /// daemon cannot approve its own request or lift its own suspension.
    #[serde(default)]
    pub local_decisions: bool,
    /// Key-value bucket of the fleet's signed suspension list.
    #[serde(default = "default_suspensions_bucket")]
    pub suspensions_bucket: String,
}

fn default_suspensions_bucket() -> String {
    sluice_fleet::subjects::SUSPENSIONS_BUCKET.into()
}

/// The evidence spool: every chain event, once on disk, as a JSON line in
/// bounded rotating segments (`spool/`), for shipping (`ship.nats`) or any
/// log shipper. On when `ship.nats` is set or `enabled: true`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolSettings {
    #[serde(default)]
    pub enabled: bool,
    /// Default: `<state_dir>/spool`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default = "default_spool_max")]
    pub max_bytes: u64,
    #[serde(default = "default_spool_segment")]
    pub segment_bytes: u64,
    #[serde(default)]
    pub when_full: WhenFull,
}

fn default_spool_max() -> u64 {
    1 << 30
}
fn default_spool_segment() -> u64 {
    16 << 20
}

impl Default for SpoolSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            dir: None,
            max_bytes: default_spool_max(),
            segment_bytes: default_spool_segment(),
            when_full: WhenFull::default(),
        }
    }
}

/// What a full spool does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// New connections are refused until shipping frees space (nothing
    /// recorded goes unshipped).
    #[default]
    FailClosed,
    /// The oldest segment is dropped, counted and alarmed.
    DropOldest,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipSettings {
    #[serde(default)]
    pub nats: Option<NatsSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSettings {
    /// `nats://host:4222`
    pub url: String,
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Events go to `<subject_prefix>.<node>.<identity>`.
    #[serde(default = "default_subject_prefix")]
    pub subject_prefix: String,
    /// This node's name in subjects (default: the host name).
    #[serde(default)]
    pub node: Option<String>,
    /// Signed bundles from the fleet: this key-value bucket's `bundle` key
    /// is watched and applied as if pushed (signature, trusted keys and
    /// policy floor checked here). `null`: not watched.
    #[serde(default = "default_bundles_bucket")]
    pub bundles_bucket: Option<String>,
    /// PEM roots for the server's TLS certificate; set, TLS is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// User name; the password is read from `password_file` (0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

fn default_bundles_bucket() -> Option<String> {
    Some("SLUICE_BUNDLES".into())
}

fn default_stream() -> String {
    "SLUICE".into()
}
fn default_subject_prefix() -> String {
    "sluice.evidence".into()
}

/// The Prometheus endpoint (`GET /metrics`, OpenMetrics text).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Loopback by default; `null` turns the endpoint off. A port already
    /// taken is logged and the node runs on without metrics.
    #[serde(default = "default_metrics_listen")]
    pub listen: Option<std::net::SocketAddr>,
}

fn default_metrics_listen() -> Option<std::net::SocketAddr> {
    Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464)))
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
        }
    }
}

/// Where a connection's CI identity is read from (docs/ARCHITECTURE.md,
/// threat model): never the connecting process itself when a trusted
/// process sits above it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// The runner's per-job processes, by name (comm or executable file
    /// name) or, with a `/`, by absolute executable path (stronger: a job
    /// cannot plant a binary at a root-owned path). The topmost one above a
    /// connecting process is trusted. Default: GitHub's `Runner.Worker`
    /// and `gitlab-runner`.
    #[serde(default = "default_job_processes")]
    pub job_processes: Vec<String>,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            job_processes: default_job_processes(),
        }
    }
}

fn default_job_processes() -> Vec<String> {
    vec!["Runner.Worker".into(), "gitlab-runner".into()]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Ed25519 public keys (PEM) whose signed bundles this node accepts.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    /// Signed bundles (`*.jws`) dropped here are applied.
    #[serde(default)]
    pub watch_dir: Option<PathBuf>,
    /// Longest match any response rule may have (the hold-back window).
    #[serde(default = "default_window")]
    pub max_scan_window_bytes: usize,
    /// Largest request body buffered for request rules.
    #[serde(default = "default_request_scan")]
    pub max_request_scan_bytes: usize,
    /// WebSocket upgrades on targets with rules: `inspect` (frames are
    /// masked and judged) or `refuse` (403). Never relayed raw.
    #[serde(default)]
    pub websocket: WebSocketMode,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            trusted_keys: Vec::new(),
            watch_dir: None,
            max_scan_window_bytes: default_window(),
            max_request_scan_bytes: default_request_scan(),
            websocket: Default::default(),
        }
    }
}

fn default_window() -> usize {
    8192
}

fn default_request_scan() -> usize {
    16 * 1024 * 1024
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM files of extra roots trusted for upstream servers (on top of
    /// the system store). There is no way to switch verification off.
    #[serde(default)]
    pub extra_upstream_roots: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordSettings {
    /// Bytes of each request and response body kept in the record; the
    /// rest is counted and marked truncated.
    #[serde(default = "default_body_cap")]
    pub body_cap_bytes: usize,
    /// Group commit: records are fsynced at least this often (host power
    /// loss loses at most about this much). Against a node crash every
    /// record is safe as soon as it is written (before forwarding).
    #[serde(default = "default_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
    /// A signed checkpoint of the chain head every this many events...
    #[serde(default = "default_checkpoint_every_events")]
    pub checkpoint_every_events: u64,
    /// ...or this many seconds, whichever comes first.
    #[serde(default = "default_checkpoint_interval_secs")]
    pub checkpoint_interval_secs: u64,
}

impl Default for RecordSettings {
    fn default() -> Self {
        Self {
            body_cap_bytes: default_body_cap(),
            fsync_interval_ms: default_fsync_interval_ms(),
            checkpoint_every_events: default_checkpoint_every_events(),
            checkpoint_interval_secs: default_checkpoint_interval_secs(),
        }
    }
}

fn default_fsync_interval_ms() -> u64 {
    200
}

fn default_checkpoint_every_events() -> u64 {
    1000
}

fn default_checkpoint_interval_secs() -> u64 {
    10
}

fn default_body_cap() -> usize {
    64 * 1024
}

/// How a target's connections are handled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain TCP: spliced and recorded as a connection.
    #[default]
    None,
    /// TLS terminated with the node's CA when the SNI is a target name;
    /// other names (and no SNI, IP literals) are refused unless
    /// `unknown_sni: splice`; ECH is always refused.
    Intercept,
    /// TLS spliced untouched (SNI recorded).
    Passthrough,
}

/// What an `intercept` target does with a ClientHello whose SNI is not one
/// of its names (another name, none at all, an IP literal).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownSni {
    /// Reset and record the reason (the default: domain fronting and
    /// SNI-less requests to a target's address never get through blind).
    #[default]
    Refuse,
    /// Splice byte for byte, recorded as a connection with its SNI.
    /// Required for all-egress targets (`0.0.0.0/0`, `::/0`).
    Splice,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Port the redirected connections arrive on (loopback only).
    #[serde(default = "default_proxy_port")]
    pub port: u16,
    #[serde(default = "default_listen_v4")]
    pub listen_v4: Ipv4Addr,
    #[serde(default = "default_listen_v6")]
    pub listen_v6: Ipv6Addr,
    /// Seconds to wait for the upstream TCP handshake.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    #[serde(default)]
    pub limits: Limits,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            port: default_proxy_port(),
            listen_v4: default_listen_v4(),
            listen_v6: default_listen_v6(),
            connect_timeout_secs: default_connect_timeout(),
            limits: Limits::default(),
        }
    }
}

/// Resource limits: what one workload (or one hostile job) can hold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Connections one identity may have open at once; more are refused
    /// and recorded.
    #[serde(default = "default_max_conns")]
    pub max_connections_per_identity: usize,
    /// A spliced connection or upgraded stream with no byte either way for
    /// this long is closed.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// HTTP/1.1: time allowed for a request's header block.
    #[serde(default = "default_header_read")]
    pub header_read_timeout_secs: u64,
    /// HTTP/1.1: an upstream connection with no request for this long is
    /// closed while the job's connection stays open; the next request
    /// opens a new one (verified like the first). Idle keep-alive
    /// connections then cost the node only their job side. 0: never.
    #[serde(default = "default_upstream_idle")]
    pub upstream_idle_secs: u64,
    /// HTTP/2: streams a client (and we, upstream) may have open at once.
    #[serde(default = "default_h2_streams")]
    pub http2_max_concurrent_streams: u32,
    /// Bytes buffered per connection and direction by the HTTP layer
    /// (HTTP/1.1 read buffer, HTTP/2 send buffer and flow-control windows).
    #[serde(default = "default_http_buffer")]
    pub http_max_buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections_per_identity: default_max_conns(),
            idle_timeout_secs: default_idle(),
            header_read_timeout_secs: default_header_read(),
            upstream_idle_secs: default_upstream_idle(),
            http2_max_concurrent_streams: default_h2_streams(),
            http_max_buffer_bytes: default_http_buffer(),
        }
    }
}

fn default_max_conns() -> usize {
    512
}
fn default_idle() -> u64 {
    600
}
fn default_upstream_idle() -> u64 {
    15
}
fn default_header_read() -> u64 {
    30
}
fn default_h2_streams() -> u32 {
    128
}
fn default_http_buffer() -> usize {
    1024 * 1024
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// cgroup v2 directories whose processes are intercepted (the CI
    /// runner service's subtree), relative to the cgroup2 mount or absolute.
    #[serde(default)]
    pub cgroups: Vec<WatchedCgroup>,
    /// Globs over cgroup paths relative to the cgroup2 mount, one `*`-glob
    /// per path component (e.g. `system.slice/docker-*.scope`): every
    /// matching cgroup is watched, including those created after start
    /// (the node attaches the moment the directory appears).
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Refuse, with the BPF LSM, what a root job could use to get around
    /// the redirect: packet sockets, leaving its watched cgroup, bpf().
    /// `false` (or a kernel without the BPF LSM) leaves detection only.
    #[serde(default = "default_true")]
    pub bpf_lsm: bool,
    /// Keep the kernel programs attached (pinned) when the node stops or
    /// dies, so watched jobs cannot reach targets without it. `sluice
    /// detach` removes them.
    #[serde(default = "default_true")]
    pub fail_closed: bool,
    /// The redirect on the root cgroup too: leaving a job cgroup, a host
    /// daemon or a container engine then changes who a connection is
    /// attributed to (a host identity), never whether it is intercepted.
    #[serde(default)]
    pub host: HostScope,
}

fn default_true() -> bool {
    true
}

/// Connections from every process of the host (`watch.host`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostScope {
    /// Attach the redirect to the root cgroup (every process but the
    /// node's own).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// cgroup subtrees never redirected (a container engine's own
    /// traffic, a monitoring agent), relative to the cgroup2 mount or
    /// absolute. A watched cgroup below one is still watched.
    #[serde(default)]
    pub exempt: Vec<PathBuf>,
    /// What a host process (outside every watched cgroup) gets on a target
    /// that carries rules or credentials: `refuse` (recorded), or `apply`
    /// (the policy decides, as for a job). Targets without rules are
    /// forwarded and recorded either way.
    #[serde(default)]
    pub ruled_targets: HostRuled,
}

impl Default for HostScope {
    fn default() -> Self {
        Self {
            enabled: true,
            exempt: Vec::new(),
            ruled_targets: HostRuled::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostRuled {
    #[default]
    Refuse,
    Apply,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchedCgroup {
    pub path: PathBuf,
    /// Create the directory if it does not exist (demo and tests).
    #[serde(default)]
    pub create: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// How often target host names are resolved again (system resolver).
    #[serde(default = "default_refresh")]
    pub refresh_secs: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            refresh_secs: default_refresh(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub name: String,
    /// DNS names, resolved with the system resolver and kept fresh.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Literal addresses or CIDR prefixes.
    #[serde(default)]
    pub addresses: Vec<AddrOrNet>,
    /// Destination ports; empty means every port.
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub tls: TlsMode,
    /// Extra names matched against the TLS SNI but not resolved (for
    /// targets given by address). `*.example.com` matches subdomains.
    #[serde(default)]
    pub sni: Vec<String>,
    /// `intercept` only: what to do with a ClientHello naming none of the
    /// target's names.
    #[serde(default)]
    pub unknown_sni: UnknownSni,
    /// What the node parses and enforces on this target's connections.
    /// Default: `postgres` when the target's ports are exactly [5432],
    /// else `http` for TLS targets and `tcp` for plain ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// `protocol: postgres` only.
    #[serde(default)]
    pub postgres: PostgresTarget,
}

/// The protocol a target speaks, as far as the node inspects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 inside TLS (`tls: intercept`), or spliced.
    Http,
    /// The Postgres wire protocol: statements audited and judged, results
    /// masked (`postgres/`).
    Postgres,
    /// Bytes only: spliced and counted.
    Tcp,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresTarget {
    #[serde(default)]
    pub upstream_tls: UpstreamTls,
    /// With `upstream_tls: verify`: the server's certificate is accepted
    /// when its SHA-256 is one of these (any name, any issuer), instead of
    /// being verified against the roots. For self-signed servers (a
    /// `CA:TRUE` certificate from `openssl req -x509` is no end entity to
    /// the roots' verification); two entries let a certificate rotate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_cert_sha256: Vec<crate::tls::pin::CertSha256>,
}

/// TLS from the node to the database server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    /// SSLRequest; the server must accept, and its certificate must verify
    /// for the target's name (system store + `tls.extra_upstream_roots`).
    #[default]
    Verify,
    /// Plaintext to the server (a server on a trusted segment without TLS).
    Disable,
}

impl Target {
    pub fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or(
            if !self.ports.is_empty() && self.ports.iter().all(|p| *p == 5432) {
                Protocol::Postgres
            } else if self.tls == TlsMode::None {
                Protocol::Tcp
            } else {
                Protocol::Http
            },
        )
    }

    /// Names this target is intercepted under.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.hosts.iter().chain(self.sni.iter())
    }

    /// All-egress mode: an address entry covers every address
    /// (`0.0.0.0/0` or `::/0`); the SNI alone decides.
    pub fn all_egress(&self) -> bool {
        self.addresses.iter().any(|a| a.0.prefix_len() == 0)
    }
}

impl Target {
    /// Whether the node verifies a server's certificate for this target
    /// (it then needs trust roots, intercepted or not).
    pub fn verifies_server(&self) -> bool {
        self.tls == TlsMode::Intercept
            || (self.protocol() == Protocol::Postgres
                && self.postgres.upstream_tls == UpstreamTls::Verify)
    }
}

impl Config {
    /// Every name some target intercepts TLS for (the CA's constraints).
    pub fn intercept_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .targets
            .iter()
            .filter(|t| t.tls == TlsMode::Intercept)
            .flat_map(|t| t.names().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// `10.0.0.5`, `2001:db8::1` or `10.1.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AddrOrNet(pub IpNet);

impl TryFrom<String> for AddrOrNet {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Self(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|a| Self(IpNet::from(a)))
            .map_err(|_| format!("`{s}` is neither an IP address nor a CIDR prefix"))
    }
}

impl From<AddrOrNet> for String {
    fn from(a: AddrOrNet) -> String {
        a.0.to_string()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSelector {
    pub name: String,
    /// Glob over the cgroup path (as in /proc/PID/cgroup), e.g.
    /// `/system.slice/actions.runner.*`.
    pub cgroup: String,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/sluice")
}
pub fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/sluice/control.sock")
}
fn default_proxy_port() -> u16 {
    15001
}
fn default_listen_v4() -> Ipv4Addr {
    Ipv4Addr::LOCALHOST
}
fn default_listen_v6() -> Ipv6Addr {
    Ipv6Addr::LOCALHOST
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_refresh() -> u64 {
    30
}

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                Self::parse(&text, &p.display().to_string())
            }
            None => Self::parse(EMBEDDED_DEFAULT, "(embedded default)"),
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |field: String, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            field,
            message,
        };
        if self.proxy.port == 0 {
            return Err(bad("proxy.port".into(), "must not be 0".into()));
        }
        if !self.proxy.listen_v4.is_loopback() {
            return Err(bad(
                "proxy.listen_v4".into(),
                "must be a loopback address: the proxy only serves this host".into(),
            ));
        }
        if !self.proxy.listen_v6.is_loopback() {
            return Err(bad("proxy.listen_v6".into(), "must be ::1".into()));
        }
        if self.spool.enabled
            && self.ship.nats.is_none()
            && self.spool.when_full == WhenFull::FailClosed
        {
            return Err(bad(
                "spool.when_full".into(),
                "a spool without `ship.nats` is drained by nothing the node knows of (file shippers do not delete): set `when_full: drop-oldest`, or configure `ship.nats`".into(),
            ));
        }
        if let Some(c) = &self.console {
            if self.ship.nats.is_none() {
                return Err(bad(
                    "console".into(),
                    "a console is reached over NATS: configure `ship.nats` too".into(),
                ));
            }
            if c.keys.is_empty() {
                return Err(bad(
                    "console.keys".into(),
                    "names no key: no decision could ever be accepted (`sluice-console key` prints the console's)".into(),
                ));
            }
        }
        if self.spool.segment_bytes == 0 || self.spool.max_bytes < self.spool.segment_bytes {
            return Err(bad(
                "spool.max_bytes".into(),
                "must be at least `spool.segment_bytes` (and that more than 0)".into(),
            ));
        }
        if self.watch.cgroups.is_empty() && self.watch.patterns.is_empty() {
            return Err(bad(
                "watch.cgroups".into(),
                "names no cgroup (and `watch.patterns` none): nothing would be intercepted".into(),
            ));
        }
        for (i, p) in self.watch.patterns.iter().enumerate() {
            if let Err(m) = CgroupPattern::parse(p) {
                return Err(bad(format!("watch.patterns[{i}]"), m));
            }
        }
        for (i, c) in self.watch.cgroups.iter().enumerate() {
            if c.path.as_os_str().is_empty()
                || c.path
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(bad(
                    format!("watch.cgroups[{i}].path"),
                    "must be a cgroup directory without `..`".into(),
                ));
            }
        }
        if self.dns.refresh_secs == 0 {
            return Err(bad("dns.refresh_secs".into(), "must be at least 1".into()));
        }
        validate_targets(&self.targets, "targets")
            .map_err(|(field, message)| bad(field, message))?;
        if self.records.body_cap_bytes > 64 * 1024 * 1024 {
            return Err(bad(
                "records.body_cap_bytes".into(),
                "at most 64 MiB per body".into(),
            ));
        }
        for (i, name) in self.identity.job_processes.iter().enumerate() {
            let field = format!("identity.job_processes[{i}]");
            if name.trim().is_empty() {
                return Err(bad(field, "must not be empty".into()));
            }
            if name.contains('/') && !name.starts_with('/') {
                return Err(bad(
                    field,
                    "an executable path must be absolute (or give a bare name)".into(),
                ));
            }
        }
        if !(1..=60_000).contains(&self.records.fsync_interval_ms) {
            return Err(bad(
                "records.fsync_interval_ms".into(),
                "between 1 and 60000".into(),
            ));
        }
        if self.records.checkpoint_every_events == 0 || self.records.checkpoint_interval_secs == 0 {
            return Err(bad(
                "records.checkpoint_every_events".into(),
                "checkpoint_every_events and checkpoint_interval_secs must be at least 1".into(),
            ));
        }
        for (i, w) in self.workloads.iter().enumerate() {
            if let Err(e) = glob::Pattern::new(&w.cgroup) {
                return Err(bad(format!("workloads[{i}].cgroup"), e.to_string()));
            }
        }
        Ok(())
    }
}

/// Stable id of a target in the kernel maps: derived from its name, so a
/// target keeps its id when the list is replaced (a connection redirected
/// just before a policy swap still finds its target).
pub fn target_id(name: &str) -> u32 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(name.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Checks a target list; errors name the field (`PREFIX[i].field`).
pub fn validate_targets(targets: &[Target], prefix: &str) -> Result<(), (String, String)> {
    let mut names = std::collections::HashSet::new();
    for (i, t) in targets.iter().enumerate() {
        if t.name.trim().is_empty() {
            return Err((format!("{prefix}[{i}].name"), "must not be empty".into()));
        }
        if !names.insert(t.name.as_str()) {
            return Err((
                format!("{prefix}[{i}].name"),
                format!("`{}` is used by another target", t.name),
            ));
        }
        if t.hosts.is_empty() && t.addresses.is_empty() {
            return Err((
                format!("{prefix}[{i}]"),
                format!("target `{}` has neither hosts nor addresses", t.name),
            ));
        }
        for (j, h) in t.hosts.iter().enumerate() {
            if !crate::names::valid_ldh(h) || crate::names::DnsName::parse(h).is_err() {
                return Err((
                    format!("{prefix}[{i}].hosts[{j}]"),
                    format!("`{h}` is not a valid DNS name"),
                ));
            }
        }
        for (j, n) in t.sni.iter().enumerate() {
            if !crate::names::valid_ldh(n.strip_prefix("*.").unwrap_or(n))
                || crate::names::NamePattern::parse(n).is_err()
            {
                return Err((
                    format!("{prefix}[{i}].sni[{j}]"),
                    format!("`{n}` is not a valid DNS name or wildcard"),
                ));
            }
        }
        if t.tls == TlsMode::Intercept && t.hosts.is_empty() && t.sni.is_empty() {
            return Err((
                format!("{prefix}[{i}].tls"),
                "`intercept` needs names to intercept: set `hosts` or `sni`".into(),
            ));
        }
        for (j, p) in t.ports.iter().enumerate() {
            if *p == 0 {
                return Err((
                    format!("{prefix}[{i}].ports[{j}]"),
                    "port 0 is not a port; leave `ports` empty for every port".into(),
                ));
            }
        }
        if t.all_egress() {
            if t.ports.is_empty() {
                return Err((
                    format!("{prefix}[{i}].ports"),
                    "an all-egress target (`0.0.0.0/0` / `::/0`) must name its ports (e.g. [443]): every port would include the proxy's own".into(),
                ));
            }
            match t.tls {
                TlsMode::Intercept if t.unknown_sni != UnknownSni::Splice => {
                    return Err((
                        format!("{prefix}[{i}].unknown_sni"),
                        "an all-egress target (`0.0.0.0/0` / `::/0`) sees every TLS connection on its ports; names that are not its own must be spliced: set `unknown_sni: splice`".into(),
                    ))
                }
                TlsMode::None => {
                    return Err((
                        format!("{prefix}[{i}].tls"),
                        "an all-egress target (`0.0.0.0/0` / `::/0`) decides by SNI: use `tls: intercept` (with `unknown_sni: splice`) or `passthrough`".into(),
                    ))
                }
                _ => {}
            }
        }
        if t.protocol() == Protocol::Postgres {
            if t.tls == TlsMode::Passthrough {
                return Err((
                    format!("{prefix}[{i}].tls"),
                    "a `postgres` target's statements cannot be audited inside TLS the node does not terminate: use `tls: intercept` (or `none`), or `protocol: tcp`".into(),
                ));
            }
            if t.all_egress() {
                return Err((
                    format!("{prefix}[{i}].protocol"),
                    "`postgres` targets name their servers (`hosts` or `addresses`), not all egress".into(),
                ));
            }
            if !t.postgres.server_cert_sha256.is_empty()
                && t.postgres.upstream_tls == UpstreamTls::Disable
            {
                return Err((
                    format!("{prefix}[{i}].postgres.server_cert_sha256"),
                    "pins the server's TLS certificate, but `upstream_tls: disable` speaks plaintext to it: remove one of them".into(),
                ));
            }
        } else if !t.postgres.server_cert_sha256.is_empty() {
            return Err((
                format!("{prefix}[{i}].postgres.server_cert_sha256"),
                "only applies to `protocol: postgres` targets".into(),
            ));
        }
        if t.unknown_sni == UnknownSni::Splice && t.tls != TlsMode::Intercept {
            return Err((
                format!("{prefix}[{i}].unknown_sni"),
                "only applies to `tls: intercept` targets".into(),
            ));
        }
        for (j, a) in t.addresses.iter().enumerate() {
            let ip = a.0.addr();
            // `0.0.0.0/0` / `::/0` is all-egress (checked above); any
            // other prefix holding loopback or the unspecified address is not.
            if a.0.prefix_len() > 0 && (ip.is_loopback() || ip.is_unspecified()) {
                return Err((
                    format!("{prefix}[{i}].addresses[{j}]"),
                    format!("`{}` would redirect the proxy's own address space", a.0),
                ));
            }
        }
    }
    Ok(())
}

/// A glob per path component, relative to the cgroup2 mount.
#[derive(Debug, Clone)]
pub struct CgroupPattern {
    pub(crate) parts: Vec<glob::Pattern>,
    pub(crate) text: String,
}

impl CgroupPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let rel = text.trim_start_matches('/');
        if rel.is_empty() {
            return Err("must name cgroups below the cgroup2 root".into());
        }
        let mut parts = Vec::new();
        for c in std::path::Path::new(rel).components() {
            match c {
                std::path::Component::Normal(s) => {
                    let s = s.to_str().ok_or_else(|| format!("`{text}` is not UTF-8"))?;
                    if s == "**" {
                        return Err("`**` is not supported: one glob per path component".into());
                    }
                    parts.push(glob::Pattern::new(s).map_err(|e| format!("`{text}`: {e}"))?);
                }
                _ => return Err(format!("`{text}`: no `..` or `.` components")),
            }
        }
        Ok(Self {
            parts,
            text: text.to_owned(),
        })
    }

    pub(crate) fn matches_prefix(&self, comps: &[&str]) -> bool {
        comps.len() <= self.parts.len() && comps.iter().zip(&self.parts).all(|(c, p)| p.matches(c))
    }
}

/// What the node does with a WebSocket upgrade on a target with rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebSocketMode {
    /// Scan frames both ways (default).
    #[default]
    Inspect,
    /// Refuse the upgrade (403) with the reason.
    Refuse,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "watch:\n  cgroups:\n    - path: ci\n";

    #[test]
    fn embedded_default_is_valid() {
        let cfg = Config::load(None).expect("embedded default must parse");
        assert!(!cfg.targets.is_empty());
    }

    #[test]
    fn cidr_and_addresses_parse() {
        let text = format!(
            "{MINIMAL}targets:\n  - name: db\n    addresses: [\"10.1.2.3\", \"10.9.0.0/16\", \"2001:db8::/32\"]\n    ports: [5432]\n"
        );
        let cfg = Config::parse(&text, "t").unwrap();
        let a = &cfg.targets[0].addresses;
        assert_eq!(a[0].0.to_string(), "10.1.2.3/32");
        assert_eq!(a[1].0.to_string(), "10.9.0.0/16");
        assert_eq!(a[2].0.prefix_len(), 32);
    }

    fn err(text: &str) -> String {
        Config::parse(text, "t").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(&format!(
            "{MINIMAL}targets:\n  - name: db\n    addresses: [\"10.1.2.300\"]\n"
        ));
        assert!(e.contains("targets[0].addresses"), "{e}");
        assert!(e.contains("10.1.2.300"), "{e}");

        let e = err(&format!(
            "{MINIMAL}targets:\n  - name: x\n    hosts: [\"bad host\"]\n"
        ));
        assert!(e.contains("targets[0].hosts[0]"), "{e}");

        let e = err(&format!(
            "{MINIMAL}targets:\n  - name: x\n    ports: [443]\n"
        ));
        assert!(
            e.contains("targets[0]") && e.contains("neither hosts nor addresses"),
            "{e}"
        );

        let e = err(&format!("{MINIMAL}proxy:\n  port: 0\n"));
        assert!(e.contains("proxy.port"), "{e}");

        let e = err(&format!("{MINIMAL}bogus: 1\n"));
        assert!(e.contains("bogus"), "{e}");

        let e = err("targets: []\n");
        assert!(e.contains("watch"), "{e}");

        let e = err("watch:\n  patterns: [\"a/../b\"]\n");
        assert!(e.contains("watch.patterns[0]"), "{e}");
        let e = err("watch:\n  patterns: [\"a/[x\"]\n");
        assert!(e.contains("watch.patterns[0]"), "{e}");
        assert!(Config::parse(
            "watch:\n  patterns: [\"system.slice/docker-*.scope\"]\n",
            "t"
        )
        .is_ok());

        let e = err(&format!(
            "{MINIMAL}targets:\n  - name: x\n    addresses: [\"127.0.0.1\"]\n"
        ));
        assert!(e.contains("targets[0].addresses[0]"), "{e}");
        let e = err(&format!(
            "{MINIMAL}targets:\n  - name: x\n    addresses: [\"0.0.0.0/32\"]\n"
        ));
        assert!(e.contains("targets[0].addresses[0]"), "{e}");
    }

    #[test]
    fn postgres_server_pins_are_checked() {
        let t = |pg: &str| {
            format!("{MINIMAL}targets:\n  - name: db\n    addresses: [\"10.1.2.3\"]\n    ports: [5432]\n    tls: none\n    postgres:\n{pg}")
        };
        let pin = "AB:".repeat(31) + "CD";
        let cfg =
            Config::parse(&t(&format!("      server_cert_sha256: [\"{pin}\"]\n")), "t").unwrap();
        assert_eq!(cfg.targets[0].postgres.server_cert_sha256[0].0[31], 0xcd);
        assert!(cfg.targets[0].verifies_server());
        let e = err(&t("      server_cert_sha256: [\"abcd\"]\n"));
        assert!(
            e.contains("server_cert_sha256") && e.contains("not a SHA-256 certificate fingerprint"),
            "{e}"
        );
        let e = err(&t(&format!(
            "      upstream_tls: disable\n      server_cert_sha256: [\"{pin}\"]\n"
        )));
        assert!(
            e.contains("targets[0].postgres.server_cert_sha256") && e.contains("plaintext"),
            "{e}"
        );
        let cfg = Config::parse(&t("      upstream_tls: disable\n"), "t").unwrap();
        assert!(!cfg.targets[0].verifies_server());
    }

    #[test]
    fn all_egress_needs_ports_and_unknown_sni_splice() {
        let t = |extra: &str| {
            format!("{MINIMAL}targets:\n  - name: saas\n    addresses: [\"0.0.0.0/0\", \"::/0\"]\n    sni: [api.example.com]\n{extra}")
        };
        let e = err(&t("    ports: [443]\n    tls: intercept\n"));
        assert!(
            e.contains("targets[0].unknown_sni") && e.contains("unknown_sni: splice"),
            "{e}"
        );
        let e = err(&t("    tls: intercept\n    unknown_sni: splice\n"));
        assert!(e.contains("targets[0].ports"), "{e}");
        let e = err(&t("    ports: [443]\n"));
        assert!(e.contains("targets[0].tls"), "{e}");
        let cfg = Config::parse(
            &t("    ports: [443]\n    tls: intercept\n    unknown_sni: splice\n"),
            "t",
        )
        .unwrap();
        assert!(cfg.targets[0].all_egress());
        assert_eq!(cfg.targets[0].unknown_sni, UnknownSni::Splice);
        let e = err(&format!(
            "{MINIMAL}targets:\n  - name: db\n    addresses: [\"10.0.0.1\"]\n    unknown_sni: splice\n"
        ));
        assert!(e.contains("targets[0].unknown_sni"), "{e}");
    }
}
