//! Database statements as recorded (Postgres targets): what ran, for whom,
//! what the parser made of it, what the policy decided and how it ended.
//! Field names follow what SIEMs already map from database audit events
//! (Teleport's `db.session.query`: `db_name`, `db_user`, `db_query`,
//! `db_query_parameters`).
use serde::{Deserialize, Serialize};

use super::{Decision, ExchangeState};

/// What a statement does, from the Postgres parse tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementClass {
    /// SELECT (without INTO), SHOW, EXPLAIN, VALUES, TABLE.
    Read,
    /// INSERT, UPDATE, DELETE, MERGE, SELECT INTO.
    Write,
    /// CREATE, ALTER, DROP, TRUNCATE, COMMENT, RENAME...
    Ddl,
    /// GRANT, REVOKE, roles.
    Dcl,
    Copy,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, PREPARE TRANSACTION.
    Transaction,
    /// SET, RESET, DISCARD, LISTEN, prepared statements by SQL.
    Session,
    /// ALTER SYSTEM, VACUUM, CHECKPOINT, LOAD, cluster-wide commands.
    Admin,
    /// CALL, DO: code run on the server.
    Procedure,
    Other,
}

/// Statement shapes security teams block by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Drop,
    Truncate,
    DeleteWithoutWhere,
    UpdateWithoutWhere,
    /// COPY ... TO PROGRAM / FROM PROGRAM: a shell command on the server.
    CopyProgram,
    AlterSystem,
    /// Functions that read or write files on the database server
    /// (`pg_read_file`, `pg_ls_dir`, `lo_import`, `lo_export`...).
    ServerFiles,
}

/// What a statement does to the schemas unqualified names resolve in
/// (`SET search_path`, `set_config('search_path', ...)`), as far as the
/// parser can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SearchPathChange {
    /// Set to these schemas (`$user` as written), or back to the
    /// default (empty).
    Set(Vec<String>),
    /// Set to something only known when it runs.
    Unknown,
}

/// What the Postgres parser found out about one statement
/// (`postgres::classify`): the facts `on: statement` rules test.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqlFacts {
    pub class: Option<StatementClass>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shapes: Vec<Shape>,
    /// Tables touched, as written (`schema.table` or `table`), lowercase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    /// Set when the parser refused the statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_error: Option<String>,
    /// Set when the statement runs SQL that only exists when it runs (an
    /// `EXECUTE` of a built string in a DO block, a function body in a
    /// language the node does not read): why. Like a parse error, rules
    /// cannot judge it, so it is refused where blocking rules apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic: Option<String>,
    /// The statement changes the search path (the session follows it to
    /// qualify unqualified tables); not part of the record.
    #[serde(skip)]
    pub search_path: Option<SearchPathChange>,
    /// Unqualified tables qualified with each schema they may resolve to
    /// on this connection (`postgres::search_path`); matched by rules
    /// with `tables`, not recorded.
    #[serde(skip)]
    pub resolved: Vec<String>,
}

/// One statement: a simple-protocol statement (one per statement of a
/// multi-statement query string) or an extended-protocol Execute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    pub session: u64,
    pub seq: u32,
    pub state: ExchangeState,
    pub workload: String,
    pub started_at_ms: u64,
    /// `postgresql`.
    pub db_system: String,
    pub db_name: String,
    pub db_user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_application: Option<String>,
    /// `simple` or `extended`.
    pub protocol: String,
    /// Named prepared statement (extended protocol), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<String>,
    pub db_query: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub db_query_truncated: bool,
    /// Bind parameters as text, capped; credential-looking values are
    /// kept as a fingerprint; binary ones as their size.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub db_query_parameters: Vec<Option<String>>,
    #[serde(flatten)]
    pub sql: SqlFacts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_tag: Option<String>,
    /// From the command tag (`UPDATE 3` → 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_affected: Option<u64>,
    pub rows_returned: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decision>,
}

/// A database session as the job opened it and how the node logged in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbLogin {
    pub db_system: String,
    pub db_name: String,
    pub db_user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_application: Option<String>,
    /// `node-credential` (the node logged in; the job held no password)
    /// or `relay` (the job answered the server's challenge).
    pub login: String,
    /// `trust`, `password`, `md5`, `SCRAM-SHA-256`, `SCRAM-SHA-256-PLUS`.
    pub method: String,
}
