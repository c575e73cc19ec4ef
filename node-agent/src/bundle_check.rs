//! Offline checks of a policy bundle, for the security team's own CI.
//!
//! `sluice policy test` runs a bundle's rules over sample text as the node
//! does for the chosen shape — the same compiled scanners, the same stream
//! masker (plain bytes, a JSON document, SSE deltas of N characters), the
//! same request and statement verdicts — and reports each hit with a
//! masked preview, never the secret. `sluice policy lint` reports what
//! cannot work: a bundle the node would refuse (the error names the
//! pattern or field), rules that miss
//! their own `examples`, rules an earlier blocking rule always decides
//! first, targets the bundle does not define, an expiry already passed.
use std::sync::Arc;

use serde::Serialize;

use crate::{
    policy::{
        bundle::{Action, Direction},
        CompiledPolicy, PolicyError, Verdict,
    },
    record::Decision,
    scan::{ScanError, Scanner, StreamMasker, MASK},
};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("scan: {0}")]
    Scan(#[from] ScanError),
    #[error("{0}")]
    Input(String),
}

/// What the sample text is, as the node would see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum On {
    /// A request body (prompts): block, approve and log rules.
    Request,
    /// A response body: mask and log rules.
    Response,
    /// SQL sent to a database: statement rules.
    Statement,
    /// A tool call, as JSON `{"name": …, "arguments": {…} or "…"}`:
    /// `on: tool_call` rules.
    ToolCall,
}

/// How a response body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// Bytes as they are (text/plain, a download).
    Plain,
    /// The sample is one JSON document (a non-streamed API answer).
    Json,
    /// The sample is generated text, streamed as OpenAI-style SSE chat
    /// deltas of `delta` characters each; the output is the text the
    /// client puts back together.
    Sse,
}

pub struct Options {
    pub on: On,
    pub shape: Shape,
    pub delta: usize,
    pub target: Option<String>,
    pub workload: Option<String>,
}

/// One hit: where, by what, and the match with its secret masked.
#[derive(Debug, Serialize)]
pub struct HitReport {
    pub rule: String,
    pub pattern: String,
    pub start: usize,
    pub end: usize,
    pub preview: String,
}

#[derive(Debug, Serialize)]
pub struct MaskCount {
    pub rule: String,
    pub pattern: String,
    pub count: u64,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub name: String,
    pub on: On,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<Shape>,
    pub hits: Vec<HitReport>,
    /// Responses: what the masker masked, by rule and pattern.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub masked: Vec<MaskCount>,
    /// Requests and statements: `allow`, `block` or `approve`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decision>,
    /// Responses: the body the client gets (for `sse`, its text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl Outcome {
    pub fn masked_any(&self) -> bool {
        self.masked.iter().any(|m| m.count > 0)
    }

    pub fn blocked(&self) -> bool {
        self.verdict.as_deref() == Some("block")
    }

    pub fn held(&self) -> bool {
        self.verdict.as_deref() == Some("approve")
    }

    /// Nothing the rules act on: no mask, no decision of any rule.
    pub fn clean(&self) -> bool {
        !self.masked_any() && self.decisions.is_empty() && !self.blocked() && !self.held()
    }
}

/// The match of `h` in `data` with its secret span masked, at most 80
/// characters: enough to find it, nothing to leak.
fn preview(data: &[u8], start: usize, end: usize, ms: usize, me: usize) -> String {
    let mut v = data[start..end].to_vec();
    v[ms - start..me - start].fill(MASK);
    let s = String::from_utf8_lossy(&v).replace(['\n', '\r'], " ");
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(79).collect::<String>())
    } else {
        s
    }
}

fn response_scanner(p: &CompiledPolicy) -> &Scanner {
    p.as_ref()
}

fn hits_of(
    policy: &CompiledPolicy,
    scanner: &Scanner,
    data: &[u8],
    applies: &dyn Fn(usize) -> bool,
) -> Result<Vec<HitReport>, ScanError> {
    let mut out: Vec<HitReport> = scanner
        .find(data)?
        .into_iter()
        .filter(|h| applies(h.rule))
        .map(|h| HitReport {
            rule: policy.rule(h.rule).id.clone(),
            pattern: scanner.pattern(h.pattern).id.clone(),
            start: h.mask_start,
            end: h.mask_end,
            preview: preview(data, h.start, h.end, h.mask_start, h.mask_end),
        })
        .collect();
    out.sort_by_key(|h| (h.start, h.end));
    Ok(out)
}

fn verdict_fields(v: &Verdict) -> (String, Option<String>, Option<String>) {
    match v {
        Verdict::Allow => ("allow".into(), None, None),
        Verdict::Block { rule, message } => {
            ("block".into(), Some(rule.clone()), Some(message.clone()))
        }
        Verdict::Approve { rule, message, .. } => {
            ("approve".into(), Some(rule.clone()), Some(message.clone()))
        }
    }
}

/// Runs the bundle's rules over one sample as the node would.
pub fn test(
    policy: &Arc<CompiledPolicy>,
    name: &str,
    input: &[u8],
    o: &Options,
) -> Result<Outcome, CheckError> {
    let (target, workload) = (o.target.as_deref(), o.workload.as_deref());
    let scoped = |i: usize| policy.rule_applies_offline(i, target, workload);
    let mut out = Outcome {
        name: name.to_owned(),
        on: o.on,
        shape: None,
        hits: Vec::new(),
        masked: Vec::new(),
        verdict: None,
        rule: None,
        message: None,
        decisions: Vec::new(),
        output: None,
    };
    match o.on {
        On::Request => {
            out.hits = hits_of(policy, policy.request_scanner(), input, &scoped)?;
            let (v, decisions) = policy.evaluate_request_where(input, scoped)?;
            (out.verdict, out.rule, out.message) = {
                let (a, b, c) = verdict_fields(&v);
                (Some(a), b, c)
            };
            out.decisions = decisions;
        }
        On::Statement => {
            let sql = std::str::from_utf8(input)
                .map_err(|e| CheckError::Input(format!("{name}: SQL is not UTF-8: {e}")))?;
            out.hits = hits_of(policy, policy.statement_scanner(), input, &scoped)?;
            let mut first_denial = None;
            for st in crate::postgres::classify::split(sql) {
                let (v, decisions) =
                    policy.evaluate_statement_where(&st.facts, st.text.as_bytes(), scoped)?;
                if first_denial.is_none() && !matches!(v, Verdict::Allow) {
                    first_denial = Some(v);
                }
                out.decisions.extend(decisions);
            }
            let (a, b, c) = verdict_fields(first_denial.as_ref().unwrap_or(&Verdict::Allow));
            (out.verdict, out.rule, out.message) = (Some(a), b, c);
        }
        On::ToolCall => {
            let call = tool_call(name, input)?;
            let text = call.judged_text();
            out.hits = hits_of(policy, policy.tool_scanner(), text.as_bytes(), &scoped)?;
            let (v, decisions) = policy.evaluate_tool_call_where(&call, scoped)?;
            (out.verdict, out.rule, out.message) = {
                let (a, b, c) = verdict_fields(&v);
                (Some(a), b, c)
            };
            out.decisions = decisions;
        }
        On::Response => {
            out.shape = Some(o.shape);
            let masks = |i: usize| policy.rule(i).action == Action::Mask && scoped(i);
            out.hits = hits_of(policy, response_scanner(policy), input, &masks)?;
            let (p, t, w) = (policy.clone(), o.target.clone(), o.workload.clone());
            let applies: crate::scan::stream::Applies = Box::new(move |i| {
                p.rule(i).action == Action::Mask
                    && p.rule_applies_offline(i, t.as_deref(), w.as_deref())
            });
            let framing = match o.shape {
                Shape::Plain => crate::scan::Framing::Raw,
                Shape::Json => crate::scan::Framing::Json,
                Shape::Sse => crate::scan::Framing::Sse,
            };
            let mut m = StreamMasker::new(policy.clone(), framing, applies);
            let body = match o.shape {
                Shape::Plain | Shape::Json => {
                    let mut b = m.push(input)?;
                    b.extend(m.finish()?);
                    String::from_utf8_lossy(&b).into_owned()
                }
                Shape::Sse => {
                    let text = std::str::from_utf8(input).map_err(|e| {
                        CheckError::Input(format!("{name}: SSE text is not UTF-8: {e}"))
                    })?;
                    let mut b = Vec::new();
                    for event in sse_events(text, o.delta.max(1)) {
                        b.extend(m.push(event.as_bytes())?);
                    }
                    b.extend(m.finish()?);
                    sse_text(&b)?
                }
            };
            out.output = Some(body);
            out.masked = m
                .masked
                .iter()
                .map(|((rule, pattern), count)| MaskCount {
                    rule: policy.rule(*rule).id.clone(),
                    pattern: pattern.clone(),
                    count: *count,
                })
                .collect();
        }
    }
    Ok(out)
}

/// A tool call from its JSON sample: `name`, and `arguments` as an
/// object or as the JSON text an API sends.
fn tool_call(name: &str, input: &[u8]) -> Result<crate::record::ToolCall, CheckError> {
    let bad = |m: String| CheckError::Input(format!("{name}: {m}"));
    let v: serde_json::Value = serde_json::from_slice(input).map_err(|e| {
        bad(format!(
            "a tool call is JSON {{\"name\", \"arguments\"}}: {e}"
        ))
    })?;
    let tool = v["name"]
        .as_str()
        .ok_or_else(|| bad("the tool call has no \"name\"".into()))?;
    let arguments = match &v["arguments"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "{}".into(),
        other => other.to_string(),
    };
    Ok(crate::record::ToolCall {
        api: crate::record::ToolApi::OpenaiChat,
        id: "policy-test".into(),
        name: tool.into(),
        arguments,
    })
}

/// `text` as an OpenAI chat completion stream: one event per `delta`
/// characters, then `[DONE]` (what the node meets from the API).
fn sse_events(text: &str, delta: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out: Vec<String> = chars
        .chunks(delta)
        .map(|c| {
            let piece: String = c.iter().collect();
            format!(
                "data: {}\n\n",
                serde_json::json!({
                    "id": "chatcmpl-test",
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": piece}}],
                })
            )
        })
        .collect();
    out.push("data: [DONE]\n\n".into());
    out
}

/// The text a client puts together from the (masked) stream.
fn sse_text(body: &[u8]) -> Result<String, CheckError> {
    let body = String::from_utf8_lossy(body);
    let mut text = String::new();
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data).map_err(|e| {
            CheckError::Input(format!(
                "the masked stream has an event that is not JSON: {e}"
            ))
        })?;
        if let Some(s) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(s);
        }
    }
    Ok(text)
}

// ------------------------------------------------------------------ lint

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

#[derive(Debug, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Where: `rules[2] block-prod` or `packs.internal`.
    pub at: String,
    pub message: String,
}

/// Whatever in a bundle cannot work as written. A bundle that does not
/// compile is one finding (the node would refuse it the same way).
pub fn lint(text: &str, max_window: usize) -> Vec<Finding> {
    let policy = match CompiledPolicy::compile_offline(text, max_window) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            return vec![Finding {
                severity: Severity::Error,
                at: "bundle".into(),
                message: format!("refused as a node would refuse it: {e}"),
            }]
        }
    };
    let mut out = Vec::new();
    let b = &policy.bundle;
    let at = |i: usize| format!("rules[{i}] {}", b.rules[i].id);
    if policy.expired_at(std::time::SystemTime::now()) {
        out.push(Finding {
            severity: Severity::Error,
            at: "expires_at".into(),
            message: format!(
                "{} has passed: nodes refuse this bundle",
                b.expires_at.as_deref().unwrap_or("")
            ),
        });
    }
    if let Some(targets) = &b.targets {
        for (i, r) in b.rules.iter().enumerate() {
            for t in &r.targets {
                if !targets.iter().any(|x| &x.name == t) {
                    out.push(Finding {
                        severity: Severity::Warning,
                        at: at(i),
                        message: format!(
                            "target `{t}` is not among the bundle's targets: the rule never applies to it"
                        ),
                    });
                }
            }
        }
    }
    for (i, r) in b.rules.iter().enumerate() {
        let on = match r.on {
            Direction::Request => On::Request,
            Direction::Statement => On::Statement,
            Direction::Response => On::Response,
            // Result rules mask column values: their examples are values,
            // read as response text by the same patterns.
            Direction::Result => continue,
            // Examples are tool calls as JSON (`policy test --on tool_call`).
            Direction::ToolCall => On::ToolCall,
        };
        if r.examples.is_empty() {
            if matches!(r.action, Action::Block | Action::Approve) {
                out.push(Finding {
                    severity: Severity::Warning,
                    at: at(i),
                    message: "no `examples`: nothing shows the rule catches what it is for".into(),
                });
            }
            continue;
        }
        let only = |j: usize| j == i;
        for e in &r.examples.hit {
            match rule_hits(&policy, on, e.as_bytes(), &only) {
                Ok(true) => {}
                Ok(false) => out.push(Finding {
                    severity: Severity::Error,
                    at: at(i),
                    message: format!("misses its own example {:?}", clip(e)),
                }),
                Err(err) => out.push(Finding {
                    severity: Severity::Error,
                    at: at(i),
                    message: format!("example {:?} could not be scanned: {err}", clip(e)),
                }),
            }
            for id in narrow_prefilters(&policy, i, on, e.as_bytes()) {
                out.push(Finding {
                    severity: Severity::Error,
                    at: at(i),
                    message: format!(
                        "pattern `{id}`: its prefilter does not match example {:?} where its regex does; a prefilter must match wherever the regex can, or the pattern is found only when something else wakes its chunk",
                        clip(e)
                    ),
                });
            }
            // Shadowed: an earlier block/approve rule decides it first.
            if matches!(r.action, Action::Block | Action::Approve) {
                if let Some(j) = earlier_decider(&policy, i, on, e.as_bytes()) {
                    out.push(Finding {
                        severity: Severity::Warning,
                        at: at(i),
                        message: format!(
                            "example {:?} is decided first by rules[{j}] {} ({:?}): this rule never decides it",
                            clip(e),
                            b.rules[j].id,
                            b.rules[j].action
                        ),
                    });
                }
            }
        }
        for e in &r.examples.clean {
            if let Ok(true) = rule_hits(&policy, on, e.as_bytes(), &only) {
                out.push(Finding {
                    severity: Severity::Error,
                    at: at(i),
                    message: format!("hits its own clean example {:?}", clip(e)),
                });
            }
        }
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    out
}

fn clip(s: &str) -> String {
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(59).collect::<String>())
    } else {
        s.to_owned()
    }
}

/// Whether rule `i` (selected by `only`) acts on `text` read as `on`.
fn rule_hits(
    policy: &Arc<CompiledPolicy>,
    on: On,
    text: &[u8],
    only: &dyn Fn(usize) -> bool,
) -> Result<bool, CheckError> {
    Ok(match on {
        On::Request => {
            let (_, d) = policy.evaluate_request_where(text, only)?;
            !d.is_empty()
        }
        On::Response => response_scanner(policy)
            .find(text)?
            .iter()
            .any(|h| only(h.rule)),
        On::ToolCall => {
            let call = tool_call("example", text)?;
            let (_, d) = policy.evaluate_tool_call_where(&call, only)?;
            !d.is_empty()
        }
        On::Statement => {
            let sql = String::from_utf8_lossy(text);
            let mut any = false;
            for st in crate::postgres::classify::split(&sql) {
                let (_, d) =
                    policy.evaluate_statement_where(&st.facts, st.text.as_bytes(), only)?;
                any |= !d.is_empty();
            }
            any
        }
    })
}

/// Ids of rule `i`'s patterns whose prefilter misses `text` where their
/// regex matches it.
fn narrow_prefilters(policy: &CompiledPolicy, i: usize, on: On, text: &[u8]) -> Vec<String> {
    let scanner = match on {
        On::Request => policy.request_scanner(),
        On::Response => response_scanner(policy),
        On::Statement => policy.statement_scanner(),
        On::ToolCall => policy.tool_scanner(),
    };
    (0..scanner.len())
        .filter(|&p| scanner.pattern(p).rule == i && scanner.prefilter_narrower(p, text))
        .map(|p| scanner.pattern(p).id.clone())
        .collect()
}

/// The earlier rule that blocks or holds `text` before rule `i` is
/// reached, when its scope covers all of rule `i`'s.
fn earlier_decider(policy: &Arc<CompiledPolicy>, i: usize, on: On, text: &[u8]) -> Option<usize> {
    let rules = &policy.bundle.rules;
    let r = &rules[i];
    let covers = |mine: &[String], theirs: &[String]| {
        theirs.is_empty() || (!mine.is_empty() && mine.iter().all(|m| theirs.contains(m)))
    };
    (0..i).find(|&j| {
        let e = &rules[j];
        e.on == r.on
            && matches!(e.action, Action::Block | Action::Approve)
            && covers(&r.targets, &e.targets)
            && covers(&r.workloads, &e.workloads)
            && rule_hits(policy, on, text, &|k| k == j).unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUNDLE: &str = r#"
version: 1
name: t
rules:
  - id: mask
    on: response
    packs: [secrets]
    action: mask
  - id: block-prod
    on: request
    patterns: [{id: prod, regex: '(?i)production password'}]
    action: block
    message: no prod passwords
    examples:
      hit: ["the production password is x"]
      clean: ["staging password"]
  - id: block-prod-again
    on: request
    patterns: [{id: prod2, regex: '(?i)production'}]
    action: block
    examples:
      hit: ["production password", "production box"]
"#;

    fn opts(on: On, shape: Shape) -> Options {
        Options {
            on,
            shape,
            delta: 5,
            target: None,
            workload: None,
        }
    }

    #[test]
    fn sse_deltas_are_masked_as_the_node_masks_them() {
        let p = Arc::new(CompiledPolicy::compile_offline(BUNDLE, 8192).unwrap());
        let text = "key: AKIAIOSFODNN7EXAMPLE done";
        let o = test(&p, "t", text.as_bytes(), &opts(On::Response, Shape::Sse)).unwrap();
        assert_eq!(o.output.as_deref(), Some("key: ******************** done"));
        assert!(o.masked_any());
        assert_eq!(o.hits.len(), 1);
        assert!(!o.hits[0].preview.contains("AKIA"), "{:?}", o.hits);
        let o = test(&p, "t", b"nothing here", &opts(On::Response, Shape::Plain)).unwrap();
        assert!(o.clean());
    }

    #[test]
    fn requests_get_the_node_verdict() {
        let p = Arc::new(CompiledPolicy::compile_offline(BUNDLE, 8192).unwrap());
        let o = test(
            &p,
            "t",
            b"my production password",
            &opts(On::Request, Shape::Plain),
        )
        .unwrap();
        assert!(o.blocked());
        assert_eq!(o.rule.as_deref(), Some("block-prod"));
    }

    #[test]
    fn tool_calls_are_judged_offline_and_their_examples_linted() {
        let b = r#"
version: 1
name: t
rules:
  - id: agent
    on: tool_call
    packs: [agent]
    action: block
    examples:
      hit: ['{"name": "Bash", "arguments": {"command": "rm -rf ~"}}']
      clean: ['{"name": "Bash", "arguments": {"command": "ls"}}']
"#;
        let p = Arc::new(CompiledPolicy::compile_offline(b, 8192).unwrap());
        let o = test(
            &p,
            "t",
            br#"{"name": "run_terminal_cmd", "arguments": "{\"command\": \"sudo rm -rf /\"}"}"#,
            &opts(On::ToolCall, Shape::Plain),
        )
        .unwrap();
        assert!(o.blocked(), "{o:?}");
        assert!(lint(b, 8192).is_empty(), "{:?}", lint(b, 8192));
        let missed = b.replace("rm -rf ~", "rm -rf ./build");
        assert!(lint(&missed, 8192)
            .iter()
            .any(|f| f.message.contains("misses its own example")));
    }

    #[test]
    fn lint_finds_shadowed_rules_and_missed_examples() {
        let f = lint(BUNDLE, 8192);
        let text = format!("{f:?}");
        assert!(
            f.iter().any(|x| x.at.contains("block-prod-again")
                && x.message.contains("decided first by rules[1] block-prod")),
            "{text}"
        );
        let bad = BUNDLE.replace("the production password is x", "prod pw");
        let f = lint(&bad, 8192);
        assert!(
            f.iter()
                .any(|x| x.severity == Severity::Error
                    && x.message.contains("misses its own example")),
            "{f:?}"
        );
        let f = lint("version: 1\nname: x\nrules:\n  - {id: r, on: request, patterns: [{id: e, regex: 'a{0,3}'}], action: block}\n", 8192);
        assert!(
            f.iter().any(|x| x.message.contains("empty string")),
            "{f:?}"
        );
        let f = lint(
            "version: 1\nname: x\nrules:\n  - {id: r, on: request, packs: [nope], action: block}\n",
            8192,
        );
        assert!(f[0].message.contains("no pack named `nope`"), "{f:?}");
    }

    #[test]
    fn lint_names_a_prefilter_narrower_than_its_regex() {
        // The regex takes a subscript (`key"] = …`), the prefilter forgot it.
        let bundle = |pre: &str| {
            format!(
                "version: 1\nname: x\nrules:\n  - id: r\n    on: response\n    action: mask\n    patterns:\n      - id: k\n        regex: 'key\"?\\]?\\s?=\\s?\"(?P<secret>[a-z0-9]{{8}})\"'\n        prefilter: '{pre}'\n    examples:\n      hit: ['env[\"key\"] = \"abcd1234\"']\n"
            )
        };
        let f = lint(&bundle(r#"key"?\s?=\s?"[a-z0-9]{8}"#), 8192);
        assert!(
            f.iter().any(|x| x.severity == Severity::Error
                && x.message
                    .contains("pattern `k`: its prefilter does not match")),
            "{f:?}"
        );
        let f = lint(&bundle(r#"key"?\]?\s?=\s?"[a-z0-9]{8}"#), 8192);
        assert!(f.is_empty(), "{f:?}");
    }
}
