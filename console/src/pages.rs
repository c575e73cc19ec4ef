//! Server-rendered pages. Every value is interpolated through maud, which
//! HTML-escapes it: a recorded `<script>` is text on the page. The pages
//! carry no script at all, and the Content-Security-Policy (`web.rs`)
//! forbids any, so a payload that got past escaping would still not run.
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde_json::Value;

use crate::store::{ExchangeRow, Filter, NodeRow, SessionRow, PAGE};

pub mod fleet;

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1d2330}\
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}\
header a{color:#cfe0ff;text-decoration:none}main{padding:1em 1.2em}\
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;font-size:.92em}\
form.search{display:flex;flex-wrap:wrap;gap:.5em;margin-bottom:1em}form.search input{padding:.3em}\
.badge{padding:.1em .5em;border-radius:.8em;font-size:.85em;color:#fff}\
.verified{background:#2a7a2a}.partial{background:#7a6a2a}.gap{background:#b36b00}.broken{background:#b00020}\
pre{background:#f5f6f8;padding:.6em;white-space:pre-wrap;word-break:break-all;max-height:30em;overflow:auto}\
mark.masked{background:#ffd24d;color:#000}.ex{border:1px solid #ddd;border-radius:.4em;margin:.8em 0;padding:.6em}\
.muted{color:#667}.flash{padding:.5em .8em;border-radius:.3em}.flash.ok{background:#e3f4e3}.flash.err{background:#fbe3e6}\
form.decide input{padding:.3em}";

pub(crate) fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · Sluice console" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "Sluice console" }
                    a href="/sessions" { "Sessions" }
                    a href="/approvals" { "Approvals" }
                    a href="/identities" { "Identities" }
                    a href="/policy" { "Policy" }
                    a href="/nodes" { "Nodes" }
                    (crate::auth::header_badge())
                }
                main { (body) }
            }
        }
    }
}

fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let (d, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = d as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn badge(state: &str) -> Markup {
    let class = match state {
        "verified" | "partial" | "gap" | "broken" => state,
        _ => "broken",
    };
    html! { span class=(format!("badge {class}")) data-chain=(state) { (state) } }
}

fn opt(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("–")
}

/// Text with its masked spans (runs of `*` the node wrote) marked.
fn masked_text(text: &str) -> Markup {
    let mut parts: Vec<(bool, String)> = Vec::new();
    let mut cur = String::new();
    let mut stars = 0usize;
    for c in text.chars() {
        if c == '*' {
            stars += 1;
            continue;
        }
        if stars > 0 {
            push_stars(&mut parts, &mut cur, stars);
            stars = 0;
        }
        cur.push(c);
    }
    push_stars(&mut parts, &mut cur, stars);
    if !cur.is_empty() {
        parts.push((false, cur));
    }
    html! {
        @for (masked, s) in &parts {
            @if *masked { mark class="masked" title="masked by the node" { (s) } } @else { (s) }
        }
    }
}

/// Runs of four or more `*` are masks; shorter ones are text.
fn push_stars(parts: &mut Vec<(bool, String)>, cur: &mut String, n: usize) {
    if n == 0 {
        return;
    }
    if n < 4 {
        cur.push_str(&"*".repeat(n));
        return;
    }
    if !cur.is_empty() {
        parts.push((false, std::mem::take(cur)));
    }
    parts.push((true, "*".repeat(n)));
}

pub fn sessions(f: &Filter, rows: &[SessionRow]) -> Markup {
    let field = |name: &str, label: &str, v: &Option<String>| {
        html! { input name=(name) placeholder=(label) value=(v.as_deref().unwrap_or("")); }
    };
    let page_no = f.page.unwrap_or(0);
    let query_for = |page: u32| {
        let mut q: Vec<(String, String)> = Vec::new();
        for (k, v) in [
            ("repository", &f.repository),
            ("run_id", &f.run_id),
            ("job", &f.job),
            ("actor", &f.actor),
            ("identity", &f.identity),
            ("target", &f.target),
            ("node", &f.node),
            ("rule", &f.rule),
            ("q", &f.q),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                q.push((k.into(), v.into()));
            }
        }
        q.push(("page".into(), page.to_string()));
        serde_urlencoded::to_string(&q).unwrap_or_default()
    };
    page(
        "Sessions",
        html! {
            h1 { "Sessions" }
            form.search method="get" action="/sessions" {
                (field("repository", "repository (owner/repo)", &f.repository))
                (field("run_id", "run", &f.run_id))
                (field("job", "job", &f.job))
                (field("actor", "actor", &f.actor))
                (field("identity", "identity", &f.identity))
                (field("target", "target", &f.target))
                (field("node", "node", &f.node))
                (field("rule", "rule", &f.rule))
                (field("q", "text in requests, responses, SQL", &f.q))
                button type="submit" { "Search" }
            }
            @if rows.is_empty() {
                p.muted #no-sessions { "No sessions match." }
            } @else {
                table #sessions {
                    thead { tr { th { "started" } th { "node" } th { "repository" } th { "run / job" } th { "actor" } th { "target" } th { "process" } th { "exchanges" } th { "outcome" } } }
                    tbody {
                        @for s in rows {
                            tr {
                                td { a href=(format!("/sessions/{}/{}", urlencode(&s.node), s.id)) { (time(s.started_at_ms)) } }
                                td { (s.node) }
                                td { (opt(&s.repository)) }
                                td { (opt(&s.run_id)) " / " (opt(&s.job)) }
                                td { (opt(&s.actor)) }
                                td { (opt(&s.target)) }
                                td { (opt(&s.comm)) }
                                td { (s.exchanges) }
                                td { (opt(&s.outcome)) }
                            }
                        }
                    }
                }
            }
            p {
                @if page_no > 0 { a href=(format!("/sessions?{}", query_for(page_no - 1))) { "← newer" } " " }
                @if rows.len() as u32 == PAGE { a href=(format!("/sessions?{}", query_for(page_no + 1))) { "older →" } }
            }
        },
    )
}

fn headers(label: &str, v: &Value) -> Markup {
    html! {
        @if let Some(hs) = v.as_array() {
            @if !hs.is_empty() {
                div { strong { (label) } }
                pre { @for h in hs { (h["name"].as_str().unwrap_or("")) ": " (masked_text(h["value"].as_str().unwrap_or(""))) "\n" } }
            }
        }
    }
}

fn body(label: &str, b: &Value) -> Markup {
    html! {
        @if let Some(t) = b["text"].as_str() {
            div { strong { (label) } " " span.muted { (b["size"]) " bytes" @if b["truncated"] == true { ", truncated in the record" } } }
            pre.body { (masked_text(t)) }
        } @else if b["base64"].is_string() {
            div { strong { (label) } " " span.muted { (b["size"]) " bytes, binary" } }
        }
    }
}

fn exchange(e: &ExchangeRow) -> Markup {
    let r = &e.record;
    html! {
        div.ex data-protocol=(e.protocol) {
            div {
                strong { @if e.protocol == "http" { (e.summary) } @else { "SQL" } }
                " " span.muted { (time(e.started_at_ms)) " · " (opt(&e.state)) }
                @if let Some(s) = &e.status { " · " strong { (s) } }
                @if let Some(d) = r["duration_ms"].as_f64() { " · " (format!("{d:.1} ms")) }
            }
            @if e.protocol == "sql" {
                pre.sql { (masked_text(r["db_query"].as_str().unwrap_or(""))) }
            }
            @if let Some(err) = r["error"].as_str() { div { "error: " (err) } }
            @if let Some(ds) = r["decisions"].as_array() {
                @if !ds.is_empty() {
                    ul.decisions {
                        @for d in ds {
                            li { strong { (d["action"].as_str().unwrap_or("")) } " by rule " code { (d["rule"].as_str().unwrap_or("")) }
                                @if let Some(x) = d["detail"].as_str() { " — " (x) } }
                        }
                    }
                }
            }
            @if r["injected"].is_object() {
                div { "credential injected in " code { (r["injected"]["header"].as_str().unwrap_or("")) } " (the job's own was stripped)" }
            }
            @if e.protocol == "http" {
                (headers("request headers", &r["request_headers"]))
                (body("request body", &r["request_body"]))
                (headers("response headers", &r["response_headers"]))
                (body("response body", &r["response_body"]))
                (headers("response trailers", &r["response_trailers"]))
            }
        }
    }
}

pub fn replay(s: &SessionRow, ex: &[ExchangeRow], node: Option<&NodeRow>) -> Markup {
    let state = node.map_or("broken", |n| n.chain_state.as_str());
    page(
        &format!("Session {} on {}", s.id, s.node),
        html! {
            h1 { "Session " (s.id) " on " (s.node) " " (badge(state)) }
            @if let Some(d) = node.and_then(|n| n.chain_detail.as_deref()) { p.muted #chain-detail { (d) } }
            table.meta {
                tr { th { "identity" } td { code { (s.identity) } } }
                tr { th { "CI" } td { (opt(&s.ci_system)) " · " (opt(&s.repository)) " · run " (opt(&s.run_id)) " · job " (opt(&s.job)) " · actor " (opt(&s.actor)) } }
                tr { th { "target" } td { (opt(&s.target)) } }
                tr { th { "process" } td { (opt(&s.comm)) } }
                tr { th { "started" } td { (time(s.started_at_ms)) } }
                tr { th { "outcome" } td { (opt(&s.outcome)) } }
            }
            p { a #export href=(format!("/api/sessions/{}/{}/export.jsonl", urlencode(&s.node), s.id)) { "Export JSONL with proof" } " · " a #export-har href=(format!("/api/sessions/{}/{}/export.har", urlencode(&s.node), s.id)) { "HAR" } span.muted { " (check it offline: sluice verify --export FILE)" } }
            h2 { (ex.len()) " exchange(s) and statement(s)" }
            @for e in ex { (exchange(e)) }
        },
    )
}

pub fn forbidden(why: &str) -> Markup {
    page("Not allowed", html! { h1 { "Not allowed" } p { (why) } })
}

pub fn not_found(what: &str) -> Markup {
    page("Not found", html! { h1 { "Not found" } p { (what) } })
}

/// A path segment, percent-encoded (RFC 3986 unreserved kept).
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_markup_is_text_and_masks_are_marked() {
        let m = masked_text("<script>alert(1)</script> key ******************** ok **");
        let s = m.into_string();
        assert!(s.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{s}");
        assert!(s.contains("<mark class=\"masked\""), "{s}");
        assert!(s.ends_with(" ok **"), "{s}");
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(time(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(time(1_764_633_600_123), "2025-12-02 00:00:00.123Z");
    }
}
