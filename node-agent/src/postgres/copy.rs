//! `COPY ... TO STDOUT` under result masking: the rows (CopyData) read in
//! the statement's own format, delimiter, quote, escape, NULL string and
//! header, as the server writes them, so that a column rule masks exactly
//! its column's fields. Which columns a COPY has: its column list, the
//! query's output names, the header row, or (a table without a list) the
//! server's catalog (`probe_sql`, run by the node just before the COPY).
//! Unknown columns are masked whole (fail closed). Masks keep each
//! field's length and never touch a delimiter, quote or line end, so the
//! row still parses.
use std::collections::BTreeMap;

use bytes::Bytes;
use pg_query::NodeEnum;

use super::{mask, PgError};
use crate::{policy::ResultMask, scan::MASK};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Csv,
    Binary,
}

/// How one `COPY ... TO STDOUT` writes its rows.
#[derive(Clone, Debug)]
pub struct CopyOut {
    pub format: Format,
    delimiter: u8,
    quote: u8,
    escape: u8,
    null: Vec<u8>,
    /// The first row is the header (column names), still to come.
    header: bool,
    /// Column names in order, when known.
    pub columns: Option<Vec<String>>,
    /// `COPY table TO` without a column list: the table, to look its
    /// columns up (`probe_sql`).
    pub table: Option<(Option<String>, String)>,
    /// `COPY (SELECT ...) TO` whose output names the statement does not
    /// tell (`SELECT *`, unnamed expressions): the query's text, to have
    /// the server describe it (`describe_sql`).
    pub query: Option<String>,
}

impl Default for CopyOut {
    /// Text format with unknown columns: what an unreadable COPY is
    /// treated as (every field masked by a column rule).
    fn default() -> Self {
        Self {
            format: Format::Text,
            delimiter: b'\t',
            quote: b'"',
            escape: b'"',
            null: b"\\N".to_vec(),
            header: false,
            columns: None,
            table: None,
            query: None,
        }
    }
}

fn string_arg(d: &pg_query::protobuf::DefElem) -> Option<String> {
    match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
        Some(NodeEnum::String(s)) => Some(s.sval.clone()),
        Some(NodeEnum::Boolean(b)) => Some(if b.boolval { "true" } else { "false" }.into()),
        Some(NodeEnum::Integer(i)) => Some(i.ival.to_string()),
        Some(NodeEnum::AStar(_)) => Some("*".into()),
        _ => None,
    }
}

fn truthy(v: Option<&str>) -> bool {
    // `HEADER` alone is true; `HEADER match` is COPY FROM only.
    v.is_none_or(|v| {
        matches!(
            v.to_ascii_lowercase().as_str(),
            "true" | "on" | "1" | "yes" | "match"
        )
    })
}

/// The parse tree of the first statement of a parsed string.
fn first_statement(parsed: &pg_query::ParseResult) -> Option<&NodeEnum> {
    parsed.protobuf.stmts.first()?.stmt.as_ref()?.node.as_ref()
}

/// What a `COPY ... TO STDOUT` statement says about its rows; `None` for
/// anything else (COPY FROM, to a file, not COPY).
pub fn copy_out(sql: &str) -> Option<CopyOut> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok()?;
    let node = first_statement(&parsed)?;
    let NodeEnum::CopyStmt(c) = node else {
        return None;
    };
    if c.is_from || !c.filename.is_empty() || c.is_program {
        return None;
    }
    let mut out = CopyOut::default();
    let (mut delimiter, mut quote, mut escape, mut null) = (None, None, None, None);
    for o in &c.options {
        let Some(NodeEnum::DefElem(d)) = &o.node else {
            continue;
        };
        let arg = string_arg(d);
        match d.defname.as_str() {
            "format" => {
                out.format = match arg.as_deref().map(str::to_ascii_lowercase).as_deref() {
                    Some("csv") => Format::Csv,
                    Some("binary") => Format::Binary,
                    _ => Format::Text,
                }
            }
            // The old syntax: `CSV`, `BINARY` (DefElems without argument).
            "csv" => out.format = Format::Csv,
            "binary" => out.format = Format::Binary,
            "delimiter" => delimiter = arg,
            "quote" => quote = arg,
            "escape" => escape = arg,
            "null" => null = arg,
            "header" => out.header = truthy(arg.as_deref()),
            _ => {}
        }
    }
    // Single-byte options only (the server refuses others); a multibyte
    // one leaves the defaults, whose fail-closed reading masks more.
    let byte = |v: Option<String>| v.filter(|s| s.len() == 1).map(|s| s.as_bytes()[0]);
    if out.format == Format::Csv {
        out.delimiter = byte(delimiter).unwrap_or(b',');
        out.quote = byte(quote).unwrap_or(b'"');
        out.escape = byte(escape).unwrap_or(out.quote);
        out.null = null.map(String::into_bytes).unwrap_or_default();
    } else {
        out.delimiter = byte(delimiter).unwrap_or(b'\t');
        if let Some(n) = null {
            out.null = n.into_bytes();
        }
    }
    if !c.attlist.is_empty() {
        out.columns = c
            .attlist
            .iter()
            .map(|n| match &n.node {
                Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                _ => None,
            })
            .collect();
    } else if let Some(r) = &c.relation {
        out.table = Some((
            (!r.schemaname.is_empty()).then(|| r.schemaname.clone()),
            r.relname.clone(),
        ));
    } else {
        let node = c.query.as_ref().and_then(|q| q.node.as_ref());
        let targets = match node {
            Some(NodeEnum::SelectStmt(q)) => Some(&q.target_list),
            Some(NodeEnum::InsertStmt(q)) => q.returning_clause.as_ref().map(|r| &r.exprs),
            Some(NodeEnum::UpdateStmt(q)) => q.returning_clause.as_ref().map(|r| &r.exprs),
            Some(NodeEnum::DeleteStmt(q)) => q.returning_clause.as_ref().map(|r| &r.exprs),
            _ => None,
        };
        out.columns = targets.and_then(|t| query_columns(t));
        if out.columns.is_none() && matches!(node, Some(NodeEnum::SelectStmt(_))) {
            out.query = inner_query(sql);
        }
    }
    Some(out)
}

/// The text between `COPY (` and its `)`, cut by the server's own
/// scanner (a parenthesis in a string or comment is not one).
fn inner_query(sql: &str) -> Option<String> {
    use pg_query::protobuf::Token;
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let mut depth = 0usize;
    let mut start = None;
    for t in &tokens {
        match Token::try_from(t.token).unwrap_or(Token::Nul) {
            Token::Ascii40 => {
                if depth == 0 {
                    start = Some(usize::try_from(t.end).ok()?);
                }
                depth += 1;
            }
            Token::Ascii41 => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    let end = usize::try_from(t.start).ok()?;
                    return sql.get(start?..end).map(str::to_owned);
                }
            }
            _ => {}
        }
    }
    None
}

/// Output names of a target (or RETURNING) list of plain column
/// references or aliased expressions; `None` for `*` or a computed
/// column without an alias.
fn query_columns(targets: &[pg_query::protobuf::Node]) -> Option<Vec<String>> {
    if targets.is_empty() {
        return None;
    }
    targets
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

/// The columns a `COPY table TO` writes when `sql` (an earlier statement
/// of the same query string) is the plain `CREATE TABLE` of that table:
/// its column definitions in order, generated ones left out. `None` for
/// anything else (inherited, typed, partition or LIKE columns).
pub fn created_columns(sql: &str, schema: Option<&str>, table: &str) -> Option<Vec<String>> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok()?;
    let node = first_statement(&parsed)?;
    let NodeEnum::CreateStmt(c) = node else {
        return None;
    };
    let r = c.relation.as_ref()?;
    let same = r.relname == table && (schema.is_none() || Some(r.schemaname.as_str()) == schema);
    if !same || !c.inh_relations.is_empty() || c.partbound.is_some() || c.of_typename.is_some() {
        return None;
    }
    let mut out = Vec::new();
    for e in &c.table_elts {
        match &e.node {
            Some(NodeEnum::ColumnDef(d)) => {
                let generated = d.constraints.iter().any(|k| {
                    matches!(&k.node, Some(NodeEnum::Constraint(k))
                        if k.contype == pg_query::protobuf::ConstrType::ConstrGenerated as i32)
                });
                if !generated {
                    out.push(d.colname.clone());
                }
            }
            Some(NodeEnum::Constraint(_)) => {}
            _ => return None,
        }
    }
    (!out.is_empty()).then_some(out)
}

/// `E'...'` for any text, whatever `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The catalog query for the columns `COPY table TO` writes, in order:
/// every live column but generated ones (what the server's COPY takes
/// without a list). It cannot fail on a missing table (`to_regclass`
/// gives NULL, so no rows: the columns stay unknown).
pub fn probe_sql(schema: Option<&str>, table: &str) -> String {
    let name = match schema {
        Some(s) => format!("{}.{}", ident(s), ident(table)),
        None => ident(table),
    };
    format!(
        "SELECT a.attname FROM pg_catalog.pg_attribute a WHERE a.attrelid = pg_catalog.to_regclass({}) AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
        literal(&name)
    )
}

/// A query that has the server describe `COPY (query) TO`'s columns
/// without running it: no rows are fetched (`LIMIT 0`), so nothing in it
/// is evaluated; one that cannot stand as a subquery fails, and the
/// columns stay unknown.
pub fn describe_sql(query: &str) -> String {
    format!("SELECT * FROM ({query}\n) AS sluice_copy_columns LIMIT 0")
}

impl CopyOut {
    /// Whether a column rule could apply to a binary COPY (the node does
    /// not rewrite binary rows: such a COPY is refused).
    pub fn binary_needs_masking(&self, plan: &ResultMask) -> bool {
        self.format == Format::Binary
            && plan.rules.iter().any(|r| plan.has_columns(*r))
            && self
                .columns
                .as_ref()
                .is_none_or(|cols| cols.iter().any(|c| plan.column_rule(c).is_some()))
    }

    /// Whether the node must ask the server for the columns first: column
    /// rules apply and nothing in the statement names them.
    pub fn needs_probe(&self, plan: &ResultMask) -> bool {
        self.columns.is_none()
            && (self.table.is_some() || self.query.is_some())
            && !(self.header && self.format != Format::Binary)
            && plan.rules.iter().any(|r| plan.has_columns(*r))
    }

    /// The byte masks are written with: `*` unless the statement made it
    /// a delimiter, quote or escape.
    fn mask_byte(&self) -> u8 {
        [MASK, b'#', b'X']
            .into_iter()
            .find(|b| ![self.delimiter, self.quote, self.escape].contains(b))
            .unwrap_or(MASK)
    }

    /// Masks one CopyData message (one row, or the header); `None` when
    /// nothing changed.
    pub fn row(
        &mut self,
        body: &[u8],
        plan: &ResultMask,
        masked: &mut BTreeMap<String, u64>,
    ) -> Result<Option<Bytes>, PgError> {
        let mut out = body.to_vec();
        let mut changed = false;
        let column_rules = plan.rules.iter().any(|r| plan.has_columns(*r));
        if self.format == Format::Binary {
            // Refused before it ran when a column rule could apply
            // (`binary_needs_masking`); patterns still mask in place.
        } else if std::mem::take(&mut self.header) {
            // Column names, not values: they tell which column is which.
            if self.columns.is_none() {
                let names = self
                    .fields(&out)
                    .into_iter()
                    .map(|f| self.unquote(&out[f.start..f.end], f.quoted))
                    .collect();
                self.columns = Some(names);
            }
        } else if column_rules {
            let fill = self.mask_byte();
            let fields = self.fields(&out);
            // A row that does not fit the columns (the table changed since
            // they were learned): every field is unknown.
            let columns = self.columns.as_ref().filter(|c| c.len() == fields.len());
            for (i, f) in fields.into_iter().enumerate() {
                let rule = match columns {
                    Some(cols) => cols.get(i).and_then(|c| plan.column_rule(c)),
                    None => plan.rules.iter().copied().find(|r| plan.has_columns(*r)),
                };
                let Some(rule) = rule else { continue };
                let v = f.start..f.end;
                if v.is_empty() || (!f.quoted && out[v.clone()] == self.null[..]) {
                    continue;
                }
                out[v].fill(fill);
                *masked.entry(plan.rule_id(rule).to_owned()).or_default() += 1;
                changed = true;
            }
        }
        if plan.scans() {
            let fill = self.mask_byte();
            for (a, b) in mask::spans(&out.clone(), plan, masked)? {
                out[a..b].fill(fill);
                changed = true;
            }
        }
        Ok(changed.then(|| Bytes::from(out)))
    }

    /// The fields of one text or CSV row: the value bytes of each (inside
    /// the quotes of a quoted CSV field), line end excluded.
    fn fields(&self, row: &[u8]) -> Vec<Field> {
        let end = row
            .iter()
            .rposition(|b| *b != b'\n' && *b != b'\r')
            .map_or(0, |p| p + 1);
        let row = &row[..end];
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let start = i;
            if self.format == Format::Csv && row.get(i) == Some(&self.quote) {
                i += 1;
                let inner = i;
                while i < row.len() {
                    let b = row[i];
                    let next = row.get(i + 1).copied();
                    if b == self.escape
                        && (next == Some(self.quote) || (next == Some(self.escape)))
                        && !(self.escape == self.quote && next != Some(self.quote))
                    {
                        i += 2;
                    } else if b == self.quote {
                        break;
                    } else {
                        i += 1;
                    }
                }
                out.push(Field {
                    start: inner,
                    end: i.min(row.len()),
                    quoted: true,
                });
                i = (i + 1).min(row.len());
                // Up to the delimiter (nothing, in what the server writes).
                while i < row.len() && row[i] != self.delimiter {
                    i += 1;
                }
            } else {
                while i < row.len() && row[i] != self.delimiter {
                    // Text format: a backslash takes the next byte with
                    // it (an escaped delimiter is data).
                    if self.format == Format::Text && row[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i = i.min(row.len());
                out.push(Field {
                    start,
                    end: i,
                    quoted: false,
                });
            }
            if i >= row.len() {
                return out;
            }
            i += 1; // the delimiter
        }
    }

    /// A header field as a column name.
    fn unquote(&self, v: &[u8], quoted: bool) -> String {
        let mut out = Vec::with_capacity(v.len());
        let mut i = 0;
        while i < v.len() {
            let escaping = if quoted {
                v[i] == self.escape && i + 1 < v.len()
            } else {
                self.format == Format::Text && v[i] == b'\\' && i + 1 < v.len()
            };
            if escaping {
                i += 1;
            }
            out.push(v[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

struct Field {
    start: usize,
    end: usize,
    quoted: bool,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{identity::WorkloadIdentity, policy::CompiledPolicy};

    fn plan(columns: &str) -> ResultMask {
        let p = CompiledPolicy::compile(
            &format!("version: 1\nname: x\nrules:\n  - id: cols\n    on: result\n    columns: [{columns}]\n    action: mask\n  - id: keys\n    on: result\n    packs: [secrets]\n    action: mask\n"),
            "t",
            8192,
        )
        .unwrap();
        Arc::new(p)
            .result_mask("db", &WorkloadIdentity::default())
            .unwrap()
    }

    fn run(sql: &str, rows: &[&str], columns: &str) -> Vec<String> {
        let plan = plan(columns);
        let mut c = copy_out(sql).unwrap();
        let mut masked = BTreeMap::new();
        rows.iter()
            .map(|r| {
                let out = c.row(r.as_bytes(), &plan, &mut masked).unwrap();
                String::from_utf8(out.map_or(r.as_bytes().to_vec(), |b| b.to_vec())).unwrap()
            })
            .collect()
    }

    #[test]
    fn the_statements_format_decides_the_fields() {
        let email = "\"*email*\"";
        // Text, a custom delimiter, an escaped delimiter inside a value.
        assert_eq!(
            run(
                "COPY users (email, name) TO STDOUT (DELIMITER ',')",
                &["a@x.io,ada\\,b\n", "\\N,bob\n"],
                email
            ),
            ["******,ada\\,b\n", "\\N,bob\n"]
        );
        // CSV with a header: names from the header, the header kept, a
        // quoted value with a delimiter and a doubled quote masked inside
        // its quotes.
        assert_eq!(
            run(
                "COPY users TO STDOUT WITH (FORMAT csv, HEADER)",
                &["name,email\n", "ada,\"a,\"\"b\"\"@x\"\n", "bob,\n"],
                email
            ),
            ["name,email\n", "ada,\"*********\"\n", "bob,\n"]
        );
        // The old syntax, another quote and escape.
        assert_eq!(
            run(
                "COPY (SELECT name, email FROM users) TO STDOUT CSV QUOTE '''' ESCAPE '\\'",
                &["ada,'it\\'s@x'\n"],
                email
            ),
            ["ada,'*******'\n"]
        );
        // A rule matching no column leaves every row as it was.
        assert_eq!(
            run(
                "COPY users (id, name) TO STDOUT",
                &["1\tada\n"],
                "nothing_matches"
            ),
            ["1\tada\n"]
        );
        // A row with more fields than the columns known: all unknown.
        assert_eq!(
            run(
                "COPY users (id, name) TO STDOUT",
                &["1\tada\tx\n"],
                "nothing"
            ),
            ["*\t***\t*\n"]
        );
        // Unknown columns: every field masked (fail closed), NULLs kept.
        assert_eq!(
            run(
                "COPY (SELECT * FROM users) TO STDOUT",
                &["ada\t\\N\n"],
                email
            ),
            ["***\t\\N\n"]
        );
        // Patterns mask in place whatever the columns.
        let key = "AKIAQ3EGRXZ7PLM4VB2K";
        assert_eq!(
            run("COPY users (id) TO STDOUT", &[&format!("1 {key}\n")], email),
            [format!("1 {}\n", "*".repeat(20))]
        );
    }

    #[test]
    fn what_the_statement_says_about_its_columns() {
        let c = copy_out("COPY public.users TO STDOUT").unwrap();
        assert_eq!(c.table, Some((Some("public".into()), "users".into())));
        assert!(c.columns.is_none());
        assert!(c.needs_probe(&plan("email")));
        assert!(!c.needs_probe(&plan_patterns_only()));
        let c = copy_out("COPY users TO STDOUT (FORMAT csv, HEADER true)").unwrap();
        assert!(!c.needs_probe(&plan("email")));
        assert_eq!(
            copy_out("COPY (SELECT name, u.email AS mail FROM users u) TO STDOUT")
                .unwrap()
                .columns,
            Some(vec!["name".into(), "mail".into()])
        );
        let q = copy_out("COPY (SELECT lower(email) FROM users /* ) */ WHERE x = ')') TO STDOUT")
            .unwrap();
        assert!(q.columns.is_none());
        assert_eq!(
            q.query.as_deref(),
            Some("SELECT lower(email) FROM users /* ) */ WHERE x = ')'")
        );
        assert!(q.needs_probe(&plan("email")));
        assert_eq!(
            copy_out("COPY (DELETE FROM t WHERE a = 1 RETURNING a, b AS email) TO STDOUT")
                .unwrap()
                .columns,
            Some(vec!["a".into(), "email".into()])
        );
        assert!(copy_out("COPY users FROM STDIN").is_none());
        assert!(copy_out("COPY users TO '/tmp/x'").is_none());
        assert_eq!(
            created_columns(
                "CREATE TABLE t (a text, g text GENERATED ALWAYS AS (a) STORED, b int, PRIMARY KEY (b))",
                None,
                "t"
            ),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(created_columns("CREATE TABLE t (LIKE u)", None, "t"), None);
        assert_eq!(created_columns("CREATE TABLE u (a text)", None, "t"), None);
        let b = copy_out("COPY users (name) TO STDOUT (FORMAT binary)").unwrap();
        assert!(!b.binary_needs_masking(&plan("email")));
        assert!(b.binary_needs_masking(&plan("name")));
        assert_eq!(
            probe_sql(Some("s"), "t'x\\\"y"),
            "SELECT a.attname FROM pg_catalog.pg_attribute a WHERE a.attrelid = pg_catalog.to_regclass(E'\"s\".\"t''x\\\\\"\"y\"') AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum"
        );
    }

    fn plan_patterns_only() -> ResultMask {
        let p = CompiledPolicy::compile(
            "version: 1\nname: x\nrules:\n  - id: keys\n    on: result\n    packs: [secrets]\n    action: mask\n",
            "t",
            8192,
        )
        .unwrap();
        Arc::new(p)
            .result_mask("db", &WorkloadIdentity::default())
            .unwrap()
    }
}
