//! What a statement runs besides its own parse tree: the statements of a
//! DO block or a function body (plpgsql read with libpg_query's plpgsql
//! parser, SQL bodies with the SQL parser), SQL handed to functions that
//! run it (`query_to_xml`, `dblink`...), tables read by name
//! (`table_to_xml('payroll', ...)`), server file access, and changes to
//! the search path. Found by walking the whole parse tree (its JSON
//! form), so no node type can hide a call.
//!
//! What only exists when it runs (an `EXECUTE` of a built string, a body
//! in a language the node does not read) is reported as dynamic: rules
//! cannot judge it, so the policy refuses it where blocking rules apply.
use std::cell::Cell;

use serde_json::Value;

use crate::record::statement::{SearchPathChange, Shape};

/// What runs inside one statement, to be judged with it.
#[derive(Debug, Default)]
pub struct Inner {
    /// Statement texts that run (plpgsql statements, SQL function bodies,
    /// SQL given to query-running functions).
    pub sql: Vec<String>,
    /// Every relation the tree names, `schema.table` or `table`, lowercase.
    pub tables: Vec<String>,
    pub shapes: Vec<Shape>,
    pub dynamic: Option<String>,
    pub parse_error: Option<String>,
    pub search_path: Option<SearchPathChange>,
    /// A call whose arguments decide what runs: the facts of this
    /// statement may not be reused for another with other constants.
    pub constants_matter: bool,
}

/// Functions that run the SQL text given as an argument.
const RUNS_SQL: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "dblink",
    "dblink_exec",
    "dblink_send_query",
    "dblink_open",
    "ts_stat",
];
/// Functions that read a table named by their first argument.
const READS_TABLE: &[&str] = &[
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
];
/// Functions that read every table of a schema or the database.
const READS_ALL: &[&str] = &[
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
];
/// Functions that read or write files on the server.
const SERVER_FILES: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_logdir_ls",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "lo_import",
    "lo_export",
];

/// How deep SQL inside SQL is followed (a DO block running a string
/// that runs `query_to_xml` of ...); deeper is dynamic.
const MAX_DEPTH: u8 = 6;

thread_local! {
    static DEPTH: Cell<u8> = const { Cell::new(0) };
}

/// Runs `f` one level deeper, or `None` past the limit.
pub fn deeper<T>(f: impl FnOnce() -> T) -> Option<T> {
    let d = DEPTH.with(Cell::get);
    if d >= MAX_DEPTH {
        return None;
    }
    DEPTH.with(|c| c.set(d + 1));
    let out = f();
    DEPTH.with(|c| c.set(d));
    Some(out)
}

/// Walks a parse tree. `sql` is the text it was parsed from (the
/// plpgsql parser reads DO blocks and CREATE FUNCTION from it).
pub fn find(sql: &str, tree: &Value) -> Inner {
    let mut inner = Inner::default();
    let mut plpgsql = false;
    walk(tree, &mut inner, &mut plpgsql);
    if plpgsql {
        match pg_query::parse_plpgsql(sql) {
            Ok(funcs) => plpgsql_statements(&funcs, "", "", &mut inner),
            Err(e) => {
                inner.parse_error = Some(format!("the plpgsql body could not be parsed: {e}"))
            }
        }
    }
    inner.tables.sort();
    inner.tables.dedup();
    inner
}

fn node<'a>(v: &'a Value, kind: &str) -> Option<&'a Value> {
    v.get("node").and_then(|n| n.get(kind))
}

fn sval(v: &Value) -> Option<&str> {
    node(v, "String")
        .and_then(|s| s.get("sval"))
        .and_then(Value::as_str)
}

/// The value of a string constant (through casts and `||` of constants).
pub fn literal(v: &Value) -> Option<String> {
    let n = v.get("node")?;
    if let Some(c) = n.get("AConst") {
        return c
            .get("val")?
            .get("Sval")?
            .get("sval")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    if let Some(t) = n.get("TypeCast") {
        return literal(t.get("arg")?);
    }
    if let Some(e) = n.get("AExpr") {
        let op = e.get("name")?.as_array()?;
        if let [one] = &op[..] {
            if sval(one) == Some("||") {
                return Some(literal(e.get("lexpr")?)? + &literal(e.get("rexpr")?)?);
            }
        }
    }
    None
}

/// A constant of any type (`true`, `42`, `NULL`), through casts.
fn constant(v: &Value) -> bool {
    let Some(n) = v.get("node") else {
        return false;
    };
    n.get("AConst").is_some()
        || n.get("TypeCast")
            .and_then(|t| t.get("arg"))
            .is_some_and(constant)
}

fn set_dynamic(inner: &mut Inner, why: String) {
    inner.dynamic.get_or_insert(why);
}

fn walk(v: &Value, inner: &mut Inner, plpgsql: &mut bool) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| walk(i, inner, plpgsql)),
        Value::Object(map) => {
            for (k, child) in map {
                match k.as_str() {
                    "FuncCall" => func_call(child, inner),
                    "DoStmt" => do_block(child, inner, plpgsql),
                    "CreateFunctionStmt" => create_function(child, inner, plpgsql),
                    "VariableSetStmt" => variable_set(child, inner),
                    "RangeVar" => range_var(child, inner),
                    // Wherever it sits (a CTE, an SQL function's body).
                    "DeleteStmt" if without_where(child) => {
                        add_shape(inner, Shape::DeleteWithoutWhere)
                    }
                    "UpdateStmt" if without_where(child) => {
                        add_shape(inner, Shape::UpdateWithoutWhere)
                    }
                    _ => {}
                }
                walk(child, inner, plpgsql);
            }
        }
        _ => {}
    }
}

fn add_shape(inner: &mut Inner, s: Shape) {
    if !inner.shapes.contains(&s) {
        inner.shapes.push(s);
    }
}

/// An UPDATE or DELETE (JSON form) with no WHERE, or one every row passes.
fn without_where(stmt: &Value) -> bool {
    match stmt.get("where_clause") {
        None | Some(Value::Null) => true,
        Some(w) => trivially_true(w),
    }
}

/// A condition that holds for every row, or for none: one that reads no
/// column (`true`, `1 = 1`, `current_user = 'x'`), an OR with such an
/// arm, an AND of such, or a column compared with itself (`id = id`).
/// Treated as no WHERE: a filter that does not look at the row filters
/// nothing a rule cares about.
pub fn trivially_true(w: &Value) -> bool {
    if !mentions(w, "ColumnRef") {
        return true;
    }
    let Some(n) = w.get("node") else {
        return false;
    };
    if let Some(b) = n.get("BoolExpr") {
        let args: &[Value] = b
            .get("args")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        // BoolExprType: 1 AND, 2 OR, 3 NOT.
        return match b.get("boolop").and_then(Value::as_i64) {
            Some(1) => args.iter().all(trivially_true),
            Some(2) => args.iter().any(trivially_true),
            _ => false,
        };
    }
    if let Some(e) = n.get("AExpr") {
        let op = e
            .get("name")
            .and_then(Value::as_array)
            .and_then(|o| o.first())
            .and_then(sval);
        if e.get("kind").and_then(Value::as_i64) == Some(1) && matches!(op, Some("=" | ">=" | "<="))
        {
            if let (Some(l), Some(r)) = (e.get("lexpr"), e.get("rexpr")) {
                return without_locations(l) == without_locations(r);
            }
        }
    }
    false
}

fn mentions(v: &Value, kind: &str) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, c)| k == kind || mentions(c, kind)),
        Value::Array(a) => a.iter().any(|c| mentions(c, kind)),
        _ => false,
    }
}

fn without_locations(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "location")
                .map(|(k, c)| (k.clone(), without_locations(c)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_locations).collect()),
        other => other.clone(),
    }
}

fn range_var(v: &Value, inner: &mut Inner) {
    let Some(rel) = v.get("relname").and_then(Value::as_str) else {
        return;
    };
    let schema = v.get("schemaname").and_then(Value::as_str).unwrap_or("");
    let name = if schema.is_empty() {
        rel.to_ascii_lowercase()
    } else {
        format!("{schema}.{rel}").to_ascii_lowercase()
    };
    inner.tables.push(name);
}

fn func_call(v: &Value, inner: &mut Inner) {
    let Some(name) = v
        .get("funcname")
        .and_then(Value::as_array)
        .and_then(|n| n.last())
        .and_then(sval)
        .map(str::to_ascii_lowercase)
    else {
        return;
    };
    let args: &[Value] = v
        .get("args")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let name = name.as_str();
    if RUNS_SQL.contains(&name) {
        inner.constants_matter = true;
        // Each constant argument the parser reads as SQL is judged as a
        // statement (a connection string is not SQL); an argument built
        // at run time could be the SQL.
        for a in args {
            match literal(a) {
                Some(text) => {
                    if pg_query::parse(&text, pg_query::ParserOptions::DEFAULT)
                        .is_ok_and(|p| !p.protobuf.stmts.is_empty())
                    {
                        inner.sql.push(text);
                    }
                }
                None if constant(a) => {}
                None => set_dynamic(inner, format!("{name}() of a query built at run time")),
            }
        }
    } else if READS_TABLE.contains(&name) {
        inner.constants_matter = true;
        match args.first().and_then(literal) {
            Some(t) => inner.tables.push(regclass(&t)),
            None => set_dynamic(inner, format!("{name}() of a table named at run time")),
        }
    } else if READS_ALL.contains(&name) {
        set_dynamic(inner, format!("{name}() reads every table it can see"));
    } else if SERVER_FILES.contains(&name) {
        add_shape(inner, Shape::ServerFiles);
    } else if name == "set_config" {
        inner.constants_matter = true;
        match args.first().map(literal) {
            Some(Some(p)) if !p.eq_ignore_ascii_case("search_path") => {}
            Some(Some(_)) => {
                inner.search_path = Some(match args.get(1).and_then(literal) {
                    Some(path) => SearchPathChange::Set(schemas(&path)),
                    None => SearchPathChange::Unknown,
                })
            }
            // The setting's name is computed: it may be the path.
            _ => inner.search_path = Some(SearchPathChange::Unknown),
        }
    }
}

/// `'hr.Payroll'` or `'"Hr"."Payroll"'` as the parser would name it.
fn regclass(text: &str) -> String {
    text.split('.')
        .map(
            |p| match p.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
                Some(quoted) => quoted.to_owned(),
                None => p.trim().to_ascii_lowercase(),
            },
        )
        .collect::<Vec<_>>()
        .join(".")
        .to_ascii_lowercase()
}

/// `hr, "$user", public` → its schemas.
pub fn schemas(path: &str) -> Vec<String> {
    path.split(',')
        .map(|s| {
            let s = s.trim();
            match s.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
                Some(q) => q.to_owned(),
                None => s.to_ascii_lowercase(),
            }
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// `DefElem`s by name: (name, argument).
fn def_elems(list: Option<&Value>) -> Vec<(&str, &Value)> {
    list.and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|d| node(d, "DefElem"))
                .filter_map(|d| Some((d.get("defname")?.as_str()?, d.get("arg")?)))
                .collect()
        })
        .unwrap_or_default()
}

fn do_block(v: &Value, inner: &mut Inner, plpgsql: &mut bool) {
    let elems = def_elems(v.get("args"));
    let language = elems
        .iter()
        .find(|(n, _)| *n == "language")
        .and_then(|(_, a)| sval(a))
        .unwrap_or("plpgsql")
        .to_ascii_lowercase();
    if language == "plpgsql" {
        *plpgsql = true;
    } else {
        set_dynamic(
            inner,
            format!("a DO block in {language}, which the node does not read"),
        );
    }
}

fn create_function(v: &Value, inner: &mut Inner, plpgsql: &mut bool) {
    let elems = def_elems(v.get("options"));
    let language = elems
        .iter()
        .find(|(n, _)| *n == "language")
        .and_then(|(_, a)| sval(a))
        .unwrap_or("sql")
        .to_ascii_lowercase();
    match language.as_str() {
        "plpgsql" => *plpgsql = true,
        "sql" => {
            // A string body (`AS '...'`); an SQL-standard body (`BEGIN
            // ATOMIC`, `RETURN`) is part of this tree and walked with it.
            let body = elems
                .iter()
                .find(|(n, _)| *n == "as")
                .and_then(|(_, a)| node(a, "List"))
                .and_then(|l| l.get("items"))
                .and_then(Value::as_array)
                .and_then(|items| items.first())
                .and_then(sval);
            if let Some(body) = body {
                inner.sql.push(body.to_owned());
            }
        }
        other => set_dynamic(
            inner,
            format!("a function in {other}, which the node does not read"),
        ),
    }
}

fn variable_set(v: &Value, inner: &mut Inner) {
    let name = v.get("name").and_then(Value::as_str).unwrap_or("");
    // VariableSetKind: 1 a value, 2 DEFAULT, 3 FROM CURRENT, 5 RESET,
    // 6 RESET ALL (the path included).
    let kind = v.get("kind").and_then(Value::as_i64).unwrap_or(0);
    if !name.eq_ignore_ascii_case("search_path") && kind != 6 {
        return;
    }
    if kind == 3 {
        inner.search_path = Some(SearchPathChange::Unknown);
        return;
    }
    let args: Vec<String> = v
        .get("args")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(literal).collect())
        .unwrap_or_default();
    inner.search_path = Some(SearchPathChange::Set(
        args.iter().flat_map(|a| schemas(a)).collect(),
    ));
}

/// The plpgsql parser's functions: each expression, judged as what it is.
fn plpgsql_statements(v: &Value, parent: &str, field: &str, inner: &mut Inner) {
    match v {
        Value::Array(items) => items
            .iter()
            .for_each(|i| plpgsql_statements(i, parent, field, inner)),
        Value::Object(map) => {
            if let Some(expr) = map.get("PLpgSQL_expr") {
                let dynamic = field == "dynquery"
                    || (field == "query"
                        && matches!(parent, "PLpgSQL_stmt_dynexecute" | "PLpgSQL_stmt_dynfors"));
                plpgsql_expr(expr, dynamic, inner);
                return;
            }
            for (k, child) in map {
                if k.starts_with("PLpgSQL_") {
                    plpgsql_statements(child, k, "", inner);
                } else {
                    plpgsql_statements(child, parent, k, inner);
                }
            }
        }
        _ => {}
    }
}

fn plpgsql_expr(expr: &Value, dynamic: bool, inner: &mut Inner) {
    let Some(query) = expr.get("query").and_then(Value::as_str) else {
        return;
    };
    // RawParseMode: 0 a statement, 1 a type name, 2 an expression,
    // 3-5 an assignment (`target := expression`).
    let mode = expr.get("parseMode").and_then(Value::as_i64).unwrap_or(0);
    let text = match mode {
        0 => query.to_owned(),
        1 => return,
        2 => format!("SELECT {query}"),
        _ => {
            let rest = query
                .split_once(":=")
                .or_else(|| query.split_once('='))
                .map_or(query, |(_, r)| r);
            format!("SELECT {rest}")
        }
    };
    if dynamic {
        // The string EXECUTE runs: known when it is built from constants.
        match pg_query::parse(&text, pg_query::ParserOptions::DEFAULT) {
            Ok(p) => {
                let target = serde_json::to_value(&p.protobuf)
                    .ok()
                    .and_then(|t| first_target(&t).and_then(literal));
                match target {
                    Some(sql) => inner.sql.push(sql),
                    None => set_dynamic(inner, "EXECUTE of a string built at run time".into()),
                }
            }
            Err(e) => {
                inner.parse_error = Some(format!("an EXECUTE argument could not be parsed: {e}"))
            }
        }
    }
    inner.sql.push(text);
}

/// `SELECT <this>`: the first target's value.
fn first_target(tree: &Value) -> Option<&Value> {
    tree.get("stmts")?
        .get(0)?
        .get("stmt")?
        .get("node")?
        .get("SelectStmt")?
        .get("target_list")?
        .get(0)?
        .get("node")?
        .get("ResTarget")?
        .get("val")
}
