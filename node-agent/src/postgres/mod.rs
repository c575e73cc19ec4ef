//! The Postgres wire protocol on the data path (`protocol: postgres`
//! targets): startup and TLS on both sides (`startup.rs`), login
//! (`auth.rs`), then two pumps over one shared `Flow`:
//!
//! - client → server (`frontend.rs`): each statement (simple query, or
//!   Parse/Bind/Execute of the extended protocol) is classified with the
//!   real Postgres parser (`classify.rs`), judged (suspension, `on:
//!   statement` rules, approvals), recorded before it is forwarded, or
//!   refused with an ErrorResponse in its place;
//! - server → client (`backend.rs`): results are matched to their
//!   statements in order, rows masked (`mask.rs`) and each statement
//!   recorded with its command tag, row counts, SQLSTATE and duration.
//!
//! Messages are framed and checked by `codec.rs`; nothing from either
//! side is trusted for a length or an index.
mod auth;
mod backend;
pub mod classify;
mod codec;
mod copy;
mod frontend;
mod mask;
mod nested;
mod notice;
mod search_path;
mod startup;

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tracing::{info, warn};

use crate::{
    addr::OrigDstAddr,
    config::Target,
    policy::ResultMask,
    record::{statement::DbLogin, Outcome, Statement, TlsInfo},
    session::Session,
    tls::TlsContext,
};
use codec::{Message, Reader};

/// Largest message accepted from either side (a COPY row, a big query).
const MAX_MESSAGE: usize = 64 << 20;
/// Statements and describes in flight (pipelined) per connection, and
/// prepared statements and portals kept per connection.
const MAX_IN_FLIGHT: usize = 4096;
const MAX_NAMED: usize = 4096;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("malformed Postgres message: {0}")]
    Protocol(String),
    #[error("refused: {1}")]
    Refused(crate::record::Refusal, String),
    #[error("client TLS handshake: {0}")]
    ClientTls(String),
    #[error("server: {0}")]
    Upstream(String),
    #[error("the server refused the login: {0}")]
    LoginRefused(String),
    #[error("the server requires SCRAM channel binding (SCRAM-SHA-256-PLUS), which cannot pass through a node that inspects TLS; configure a node-held credential for this role (bundle `credentials` with `user`), or connect with channel_binding=disable")]
    ChannelBinding,
}

/// Where a Postgres connection goes and how TLS is done on each side.
pub struct Endpoint {
    /// Set when the target is `tls: intercept` and the node has a CA.
    pub client_tls: Option<Arc<TlsContext>>,
    /// Trust roots for the server's certificate.
    pub upstream_tls: Option<Arc<crate::tls::Upstream>>,
    pub target: Option<Target>,
    pub dst: OrigDstAddr,
}

impl Endpoint {
    /// The target's names, normalised (leaves and upstream verification).
    fn names(&self) -> Vec<String> {
        self.target
            .iter()
            .flat_map(|t| t.names())
            .filter_map(|n| crate::names::DnsName::parse(n).ok())
            .map(|n| n.as_str().to_owned())
            .collect()
    }

    /// The name the server's certificate must carry: the client's SNI if
    /// it is a target name, else the target's first name, else the
    /// address it connected to.
    fn server_name(&self, sni: Option<&str>) -> String {
        sni.map(str::to_owned)
            .or_else(|| self.names().into_iter().next())
            .unwrap_or_else(|| self.dst.0.ip().to_string())
    }
}

/// The database session as the job opened it.
#[derive(Clone, Debug)]
pub struct DbSession {
    pub database: String,
    pub user: String,
    pub application: Option<String>,
}

/// Named prepared statement or portal, as the client defined it.
#[derive(Clone, Debug)]
struct Prepared {
    sql: Arc<str>,
    facts: crate::record::SqlFacts,
    decisions: Vec<crate::record::Decision>,
    /// `SearchPath::generation` when it was judged.
    path_generation: u32,
}

#[derive(Clone, Debug)]
struct Portal {
    statement: String,
    sql: Arc<str>,
    facts: crate::record::SqlFacts,
    decisions: Vec<crate::record::Decision>,
    params: Vec<Option<String>>,
    result_formats: Vec<i16>,
}

/// One column of a RowDescription.
#[derive(Clone, Debug)]
pub struct Field {
    pub name: String,
    pub type_oid: u32,
    pub format: i16,
}

/// A statement forwarded and not yet answered.
struct InFlight {
    record: Statement,
    started: Instant,
    portal: Option<String>,
    result_formats: Vec<i16>,
    desc: Option<Arc<Vec<Field>>>,
    mask: Option<ResultMask>,
    masked: std::collections::BTreeMap<String, u64>,
    /// COPY TO STDOUT in progress: CopyData rows are results.
    copy_out: bool,
    /// How a COPY TO STDOUT under masking writes its rows (`copy.rs`).
    copy: Option<copy::CopyOut>,
}

enum Entry {
    Statement(Box<InFlight>),
    /// The node's own catalog query for the columns of the COPY after it
    /// (`copy::probe_sql`): answered to the node, never to the client.
    Probe {
        columns: Vec<String>,
        failed: bool,
        /// The columns are the RowDescription's (`copy::describe_sql`),
        /// not the rows' (`copy::probe_sql`).
        described: bool,
        /// Which statement of the query string after the probes is the
        /// COPY (0 = the first).
        statement: usize,
    },
    /// Describe of a portal (`true`) or statement, awaiting T or n.
    Describe {
        portal: bool,
        name: String,
    },
    /// Sync or a simple query: ends at the server's ReadyForQuery.
    /// `inject` is written to the client just before it (a refusal in
    /// its place in the stream); `swallow_empty` drops the server's
    /// EmptyQueryResponse to the empty query sent in a refused one's stead.
    GroupEnd {
        inject: Option<Message>,
        swallow_empty: bool,
    },
}

/// What the two pumps share: the in-flight queue in server order, and
/// the row descriptions the client asked for.
#[derive(Default)]
struct Flow {
    queue: VecDeque<Entry>,
    portal_desc: HashMap<String, Arc<Vec<Field>>>,
    statement_desc: HashMap<String, Arc<Vec<Field>>>,
    /// Portal → statement (row descriptions of a statement apply to its
    /// portals, with the Bind's result formats).
    portal_statement: HashMap<String, String>,
    /// The server said `standard_conforming_strings` is off: it reads a
    /// backslash in '...' as an escape, the node's parser does not.
    backslash_escapes: bool,
    /// A statement completed since the last ReadyForQuery: it may have
    /// changed a setting the server reports only at the next one.
    unreported: bool,
    /// The frontend waits for the queue to empty (`progress` wakes it).
    waiting: bool,
    progress: Arc<tokio::sync::Notify>,
}

/// `name\0value\0` of a ParameterStatus: whether it reports
/// `standard_conforming_strings`, and then whether it is off.
fn backslash_escapes(body: &[u8]) -> Option<bool> {
    let mut b = body;
    let name = codec::cstr(&mut b).ok()?;
    let value = codec::cstr(&mut b).ok()?;
    (name == "standard_conforming_strings").then(|| value != "on")
}

type Shared = Arc<Mutex<Flow>>;

fn lock(f: &Shared) -> std::sync::MutexGuard<'_, Flow> {
    f.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the connection record learns from the Postgres path.
#[derive(Default)]
pub struct Opened {
    pub tls: Option<TlsInfo>,
    pub database: Option<DbLogin>,
}

/// Builds what the Postgres path compiles once (the scanner that redacts
/// statement records), off the data threads; the daemon spawns this at
/// start when a target speaks Postgres.
pub async fn warm() {
    frontend::redaction_ready().await;
}

/// Drives one intercepted Postgres connection; returns how it ended and
/// what the connection record should show of it.
pub async fn serve<C: Io + 'static>(
    ctx: Arc<Session>,
    client: C,
    upstream: TcpStream,
    ep: Endpoint,
) -> (Outcome, Opened) {
    let mut opened = Opened::default();
    let outcome = match run(&ctx, client, upstream, &ep, &mut opened).await {
        Ok(()) => Outcome::Closed,
        Err(PgError::Refused(kind, reason)) => Outcome::Refused { reason, kind },
        Err(e @ (PgError::Upstream(_) | PgError::LoginRefused(_))) => Outcome::UpstreamFailed {
            error: e.to_string(),
        },
        Err(e) => Outcome::Failed {
            error: e.to_string(),
        },
    };
    (outcome, opened)
}

/// The connection's phases: startup, admission, login, then the two
/// pumps until either side ends.
async fn run<C: Io + 'static>(
    ctx: &Arc<Session>,
    client: C,
    upstream: TcpStream,
    ep: &Endpoint,
    opened: &mut Opened,
) -> Result<(), PgError> {
    let opening = tokio::time::timeout(
        std::time::Duration::from_secs(ctx.limits.header_read_timeout_secs.max(1)),
        startup::accept_client(client, ep),
    )
    .await
    .map_err(|_| PgError::Protocol("no startup packet in time".into()))??;
    let mut start = match opening {
        startup::Opening::Cancel { packet } => {
            info!(session = ctx.id, workload = %ctx.workload(), "cancel request forwarded");
            startup::forward_cancel(upstream, ep, &ep.server_name(None), &packet).await?;
            return Ok(());
        }
        startup::Opening::Session {
            client,
            version,
            params,
            tls,
            sni,
        } => {
            opened.tls = tls;
            Startup {
                client: Reader::new(client, MAX_MESSAGE),
                version,
                params,
                sni,
            }
        }
    };
    let db = start.db_session();
    admit(ctx, &mut start).await?;
    let (server, login) = log_in(
        ctx,
        &mut start,
        upstream,
        ep,
        &db.user,
        opened.tls.is_some(),
    )
    .await?;
    info!(session = ctx.id, workload = %ctx.workload(), database = %db.database, user = %db.user,
        login = login.mode, method = %login.method, "database session open");
    opened.database = Some(DbLogin {
        db_system: "postgresql".into(),
        db_name: db.database.clone(),
        db_user: db.user.clone(),
        db_application: db.application.clone(),
        login: login.mode.into(),
        method: login.method.clone(),
    });
    pump(ctx, start.client, server, db, login.backslash_escapes).await
}

/// A session's startup packet as the client sent it.
struct Startup {
    client: Reader<Box<dyn Io>>,
    version: u32,
    params: Vec<(String, String)>,
    /// The client's normalised SNI, when it is one of the target's names.
    sni: Option<String>,
}

impl Startup {
    /// A startup parameter's value.
    fn param(&self, k: &str) -> Option<String> {
        self.params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    }

    /// The database session the client asks for.
    fn db_session(&self) -> DbSession {
        let user = self.param("user").unwrap_or_default();
        DbSession {
            database: self.param("database").unwrap_or_else(|| user.clone()),
            user,
            application: self.param("application_name"),
        }
    }
}

/// Admission before the server is logged in to: no replication stream,
/// no suspended identity.
async fn admit(ctx: &Session, start: &mut Startup) -> Result<(), PgError> {
    // A replication connection streams table contents as CopyData in its
    // own grammar: neither statement rules nor result masking could see
    // it. Refused (fail closed).
    if let Some(mode) = start.param("replication").filter(|v| {
        !matches!(
            v.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    }) {
        let reason = format!(
            "replication connections (replication={mode}) are not inspected: their rows would bypass statement rules and result masking"
        );
        fatal(&mut start.client, "42501", &format!("sluice: {reason}")).await;
        return Err(PgError::Refused(crate::record::Refusal::Other, reason));
    }
    if let Err(d) = ctx.check_suspension(&mut Vec::new()) {
        let msg = codec::error_response("FATAL", "42501", &format!("sluice: {}", d.text()), None);
        let _ = start.client.get_mut().write_all(&msg.to_bytes()).await;
        return Err(PgError::Refused(
            crate::record::Refusal::Suspended,
            d.text(),
        ));
    }
    Ok(())
}

/// Connects to the server and logs in (node credential or relay); a
/// failure is told to the client.
async fn log_in(
    ctx: &Session,
    start: &mut Startup,
    upstream: TcpStream,
    ep: &Endpoint,
    user: &str,
    client_tls: bool,
) -> Result<(Reader<Box<dyn Io>>, auth::Login), PgError> {
    let client = &mut start.client;
    let connected =
        startup::connect_server(upstream, ep, &ep.server_name(start.sni.as_deref())).await;
    let (server, binding) = match connected {
        Ok(s) => s,
        Err(e) => {
            fatal(client, "08001", &format!("sluice: {e}")).await;
            return Err(e);
        }
    };
    let mut server = Reader::new(server, MAX_MESSAGE);
    let policy = ctx.policy();
    let cred = policy
        .credential(&ctx.target)
        .filter(|c| c.user.as_deref().is_none_or(|u| u == user));
    let node_cred = cred.map(|c| auth::NodeCredential {
        user: c.user.as_deref().unwrap_or(user),
        password: c.secret.expose(),
        weak_auth: c.weak_auth,
    });
    let startup = codec::startup_message(start.version, &start.params);
    let login = auth::login(
        client,
        &mut server,
        startup,
        node_cred,
        client_tls,
        binding.as_deref(),
    )
    .await;
    match login {
        Ok(l) => Ok((server, l)),
        Err(e) => {
            if !matches!(e, PgError::LoginRefused(_)) {
                fatal(client, "28000", &format!("sluice: {e}")).await;
            }
            warn!(session = ctx.id, workload = %ctx.workload(), error = %e, "database login failed");
            Err(e)
        }
    }
}

/// The two pumps (client → server, server → client) over one shared
/// flow, until either side ends or the connection idles out.
async fn pump(
    ctx: &Arc<Session>,
    client: Reader<Box<dyn Io>>,
    server: Reader<Box<dyn Io>>,
    db: DbSession,
    backslash_escapes: bool,
) -> Result<(), PgError> {
    // Statement records are redacted with the secrets pack: compiled off
    // this thread if the daemon has not done it yet.
    frontend::redaction_ready().await;
    let flow: Shared = Default::default();
    lock(&flow).backslash_escapes = backslash_escapes;
    let (client_io, client_buf) = client.into_parts();
    let (server_io, server_buf) = server.into_parts();
    let (cr, cw) = tokio::io::split(client_io);
    let (sr, sw) = tokio::io::split(server_io);
    let client_r = Reader::with_buffer(cr, client_buf, MAX_MESSAGE);
    let server_r = Reader::with_buffer(sr, server_buf, MAX_MESSAGE);
    let front = frontend::Frontend::new(ctx.clone(), db, flow.clone());
    let back = backend::Backend::new(ctx.clone(), flow.clone());
    let idle = std::time::Duration::from_secs(ctx.limits.idle_timeout_secs);
    let activity = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (a1, a2) = (activity.clone(), activity.clone());
    let result = tokio::select! {
        r = front.run(client_r, sw, a1) => r,
        r = back.run(server_r, cw, a2) => r,
        _ = crate::session::idle_for(idle, || activity.load(std::sync::atomic::Ordering::Relaxed)) => {
            Err(PgError::Protocol(format!("idle for {}s (limits.idle_timeout_secs)", idle.as_secs())))
        }
    };
    unanswered(ctx, &flow);
    result
}

/// Records the statements still in flight when either side went away.
fn unanswered(ctx: &Session, flow: &Shared) {
    let left: Vec<Entry> = lock(flow).queue.drain(..).collect();
    for e in left {
        if let Entry::Statement(mut f) = e {
            f.record
                .error
                .get_or_insert_with(|| "connection ended before the statement's result".into());
            backend::finish(ctx, &mut f);
        }
    }
}

/// A fatal error to the client before the session is up.
async fn fatal(client: &mut Reader<Box<dyn Io>>, sqlstate: &str, message: &str) {
    let msg = codec::error_response("FATAL", sqlstate, message, None);
    let _ = client.get_mut().write_all(&msg.to_bytes()).await;
    let _ = client.get_mut().flush().await;
}
