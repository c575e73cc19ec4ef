//! The fleet pages: approvals (held now, live; decide with a reason),
//! identities (suspend and resume across the fleet), and what nodes'
//! heartbeats say. Forms carry the principal's CSRF token; buttons a
//! role may not use are not shown (the handlers check again).
use maud::{html, Markup};
use sluice_fleet::{approval::Held, suspension::List};

use super::{opt, page, time, urlencode};
use crate::{
    auth::{Principal, Role},
    fleet::{Fleet, NodeBeat},
    store::{AuditRow, NodeRow, SessionRow},
};

/// A result to show above a page (a decision made, a refusal).
pub enum Flash {
    None,
    Done(String),
    Failed(String),
}

fn flash(f: &Flash) -> Markup {
    html! {
        @match f {
            Flash::None => {},
            Flash::Done(m) => p.flash.ok #flash { (m) },
            Flash::Failed(m) => p.flash.err #flash { (m) },
        }
    }
}

fn csrf(who: &Principal) -> Markup {
    html! { input type="hidden" name="csrf" value=(who.csrf); }
}

fn ci(h: &Held) -> Markup {
    match &h.ci {
        Some(c) => html! {
            (c.system) " · " (opt(&c.repository)) " · run " (opt(&c.run_id)) " · job " (opt(&c.job)) " · actor " (opt(&c.actor))
        },
        None => html! { span.muted { "no CI job" } },
    }
}

fn actions(recent: &[AuditRow]) -> Markup {
    html! {
        @if recent.is_empty() {
            p.muted { "Nothing yet." }
        } @else {
            table #history {
                thead { tr { th { "when" } th { "who" } th { "role" } th { "what" } th { "on" } th { "detail" } } }
                tbody {
                    @for a in recent {
                        tr {
                            td { (time(a.at_ms)) } td { (a.who) } td { (a.role) } td { (a.action) } td { (a.subject) }
                            td { (a.detail["reason"].as_str().or(a.detail["error"].as_str()).unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

pub fn approvals(who: &Principal, held: &[Held], recent: &[AuditRow], f: &Flash) -> Markup {
    let ids: Vec<String> = held
        .iter()
        .map(|h| format!("{}/{}", h.node, h.id))
        .collect();
    page(
        "Approvals",
        html! {
            h1 { "Approvals" }
            (flash(f))
            h2 { "Held now" }
            div #held data-held=(ids.join(",")) {
                @if held.is_empty() {
                    p.muted #none-held { "No request is waiting for a decision." }
                }
                @for h in held {
                    div.ex.held data-node=(h.node) data-id=(h.id) {
                        p {
                            strong { (h.method) " " (h.authority) (h.path) }
                            " on " a href=(format!("/sessions/{}/{}", urlencode(&h.node), h.session)) { (h.node) " session " (h.session) }
                            " · rule " code { (h.rule) }
                        }
                        p.muted { (h.message) }
                        p { "identity " code { (h.identity) } " · " (ci(h)) }
                        p.muted { "held " (time(h.created_ms)) " · denied at " (time(h.expires_ms)) " unless decided" }
                        pre { (h.preview) }
                        @if who.role >= Role::Approver {
                            form.decide method="post" action=(format!("/approvals/{}/{}", urlencode(&h.node), h.id)) {
                                (csrf(who))
                                input name="reason" placeholder="reason (recorded)" size="40";
                                button name="verdict" value="approve" { "Approve" }
                                " "
                                button name="verdict" value="deny" { "Deny" }
                            }
                        } @else {
                            p.muted { "Deciding needs the approver role." }
                        }
                    }
                }
            }
            h2 { "Decided from the console" }
            (actions(recent))
            script src="/assets/live.js" {}
        },
    )
}

pub fn identities(
    who: &Principal,
    list: Option<&List>,
    recent: &[SessionRow],
    history: &[AuditRow],
    f: &Flash,
) -> Markup {
    let mut seen = std::collections::BTreeSet::new();
    page(
        "Identities",
        html! {
            h1 { "Identities" }
            (flash(f))
            h2 { "Suspended across the fleet" }
            @match list {
                None => p.flash.err { "The suspension list cannot be read now (is NATS reachable?)." },
                Some(l) if l.entries.is_empty() => p.muted #none-suspended { "Nothing is suspended." },
                Some(l) => table #suspended {
                    thead { tr { th { "scope" } th { "value" } th { "reason" } th { "by" } th { "since" } th {} } }
                    tbody {
                        @for e in &l.entries {
                            tr {
                                td { (e.scope.as_str()) } td { code { (e.value) } } td { (e.reason) } td { (e.by) } td { (time(e.at_ms)) }
                                td {
                                    @if who.role >= Role::Admin {
                                        form method="post" action="/identities/resume" {
                                            (csrf(who))
                                            input type="hidden" name="scope" value=(e.scope.as_str());
                                            input type="hidden" name="value" value=(e.value);
                                            button { "Resume" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                },
            }
            @if who.role >= Role::Approver {
                h2 { "Suspend" }
                form #suspend method="post" action="/identities/suspend" {
                    (csrf(who))
                    select name="scope" {
                        option value="repository" { "repository" }
                        option value="actor" { "actor" }
                        option value="identity" { "identity" }
                    }
                    " "
                    input name="value" placeholder="owner/name, actor or identity id" size="32" required;
                    " "
                    input name="reason" placeholder="reason (recorded)" size="32" required;
                    " "
                    button { "Suspend on every node" }
                }
            }
            h2 { "Seen recently" }
            table #recent {
                thead { tr { th { "identity" } th { "repository" } th { "actor" } th { "node" } th { "last session" } } }
                tbody {
                    @for s in recent {
                        @if seen.insert(s.identity.clone()) {
                            tr {
                                td { a href=(format!("/sessions?identity={}", urlencode(&s.identity))) { code { (s.identity) } } }
                                td { (opt(&s.repository)) } td { (opt(&s.actor)) } td { (s.node) } td { (time(s.started_at_ms)) }
                            }
                        }
                    }
                }
            }
            h2 { "Changed from the console" }
            (actions(history))
        },
    )
}

/// The bundle the fleet follows, what each node has in force, and (admin)
/// publishing a signed bundle.
pub fn policy(
    who: &Principal,
    published: &Result<Option<crate::fleet::PublishedBundle>, crate::fleet::FleetError>,
    beats: &std::collections::BTreeMap<String, NodeBeat>,
    history: &[AuditRow],
    f: &Flash,
) -> Markup {
    page(
        "Policy",
        html! {
            h1 { "Policy" }
            (flash(f))
            h2 { "Published for the fleet" }
            @match published {
                Ok(Some(b)) => p #published { "bundle " strong { (b.name) } " version " strong { (b.version) } ", signed by key " code { (b.signer) } " (bucket revision " (b.revision) "). Each node checks the signature against its own trusted keys." },
                Ok(None) => p.muted #published { "No bundle published yet: nodes run the bundle they were given." },
                Err(e) => p.flash.err { (e.to_string()) },
            }
            h2 { "In force per node" }
            table #policy-nodes {
                thead { tr { th { "node" } th { "version in force" } th { "floor" } th { "expired" } th { "heartbeat" } } }
                tbody {
                    @for (name, b) in beats {
                        tr data-node=(name) {
                            td { (name) }
                            td.version { (b.beat.status["policy_version"].as_u64().unwrap_or(0)) }
                            td { (b.beat.status["policy_floor"].as_u64().unwrap_or(0)) }
                            td { @if b.beat.status["policy_expired"].as_bool().unwrap_or(false) { span.badge.broken { "expired" } } @else { "no" } }
                            td { (time(b.received_ms)) }
                        }
                    }
                }
            }
            @if who.role >= Role::Admin {
                h2 { "Publish a signed bundle" }
                form #publish method="post" action="/policy" {
                    (csrf(who))
                    p.muted { "Paste the JWS from " code { "sluice policy sign" } "." }
                    textarea name="jws" rows="6" cols="100" required {}
                    br;
                    button { "Publish to every node" }
                }
            }
            h2 { "Published from the console" }
            (actions(history))
        },
    )
}

/// The node table, with what each node's last heartbeat says.
pub fn nodes(rows: &[NodeRow], beats: &std::collections::BTreeMap<String, NodeBeat>) -> Markup {
    let mut names: std::collections::BTreeSet<&str> =
        rows.iter().map(|n| n.name.as_str()).collect();
    names.extend(beats.keys().map(String::as_str));
    page(
        "Nodes",
        html! {
            h1 { "Nodes" }
            table #nodes {
                thead { tr {
                    th { "node" } th { "chain" } th { "events" } th { "head" } th { "checkpoint" } th { "node key" } th { "last event" }
                    th { "heartbeat" } th { "version" } th { "policy" } th { "containment" } th { "spool" } th { "decisions" } th { "detail" }
                } }
                tbody {
                    @for name in names {
                        @let n = rows.iter().find(|n| n.name == name);
                        @let b = beats.get(name);
                        tr data-node=(name) {
                            td { a href=(format!("/sessions?node={}", urlencode(name))) { (name) } }
                            td { (super::badge(n.map_or("partial", |n| n.chain_state.as_str()))) }
                            td { (n.map_or(0, |n| n.events)) }
                            td { (n.map_or(0, |n| n.head_seq)) }
                            td.checkpoint {
                                @match n.and_then(|n| n.checkpoint_n.zip(n.checkpoint_seq)) {
                                    Some((c, s)) => { "#" (c) " covers " (s) }
                                    None => span.muted { "none yet" },
                                }
                            }
                            td.key {
                                @if let Some(k) = n.and_then(|n| n.key_kid.as_deref()) {
                                    code { (k) } " " span.muted { (n.and_then(|n| n.key_source.as_deref()).unwrap_or("")) }
                                }
                            }
                            td { (n.map_or("–".into(), |n| time(n.last_event_ms))) }
                            @match b {
                                None => { td.muted { "never" } td {} td {} td {} td {} td {} }
                                Some(b) => {
                                    td.heartbeat data-silent=(Fleet::silent(b)) {
                                        @if Fleet::silent(b) { span.badge.broken { "silent" } " " }
                                        (time(b.received_ms))
                                    }
                                    td { (b.beat.status["version"].as_str().unwrap_or("?")) }
                                    td { "v" (b.beat.status["policy_version"].as_u64().unwrap_or(0)) }
                                    td { (b.beat.status["containment"].as_str().unwrap_or("?")) }
                                    td { (b.beat.status["spool"].as_str().unwrap_or("?")) }
                                    td { @if b.beat.local_decisions { "local allowed" } @else { "signed only" } }
                                }
                            }
                            td { (n.and_then(|n| n.chain_detail.as_deref()).unwrap_or("")) }
                        }
                    }
                }
            }
        },
    )
}

/// Reloads the approvals page when what is held changes, unless someone
/// is typing a reason. Served as a file: the CSP allows no inline script.
pub const LIVE_JS: &str = r#""use strict";
(function () {
  var box = document.getElementById("held");
  if (!box) { return; }
  var was = box.getAttribute("data-held") || "";
  function busy() {
    var a = document.activeElement;
    if (a && a.tagName === "INPUT") { return true; }
    var inputs = document.querySelectorAll("form.decide input[name=reason]");
    for (var i = 0; i < inputs.length; i++) { if (inputs[i].value) { return true; } }
    return false;
  }
  setInterval(function () {
    fetch("/api/approvals", { credentials: "same-origin" }).then(function (r) {
      return r.ok ? r.json() : null;
    }).then(function (j) {
      if (!j) { return; }
      var now = j.held.map(function (h) { return h.node + "/" + h.id; }).join(",");
      if (now !== was && !busy()) { window.location.reload(); }
    }).catch(function () {});
  }, 2000);
})();
"#;
