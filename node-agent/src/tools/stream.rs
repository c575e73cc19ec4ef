//! Tool calls in streamed answers. An OpenAI chat stream sends a call as
//! `tool_calls` deltas (name first, arguments in pieces), the Responses API
//! as `response.output_item.added` and `response.function_call_arguments.*`
//! events, Anthropic as a `tool_use` content block whose input arrives as
//! `input_json_delta` pieces. `ToolGuard` passes every other event through
//! at once; from the first event of a call it holds the stream (the call's
//! events and whatever follows them, in order) until every open call is
//! whole and judged. Allowed: what was held goes out unchanged. Blocked:
//! what was held is dropped and the stream ends with an error event in the
//! API's own format, which its client library raises.
use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use serde_json::{json, Value};

use super::{Api, ToolCall};

/// What a judge says of one whole call.
pub enum Ruling {
    Allow,
    Block {
        rule: String,
        message: String,
    },
    /// As `Block`, the answer ending with a refusal text instead of an
    /// error (OpenAI chat and Anthropic streams; others get the error).
    Refuse {
        rule: String,
        message: String,
    },
    /// Held for a human: the stream waits for this to say allow or block.
    Wait(Pin<Box<dyn Future<Output = Ruling> + Send>>),
}

impl std::fmt::Debug for Ruling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ruling::Allow => f.write_str("Allow"),
            Ruling::Block { rule, message } => write!(f, "Block({rule}: {message})"),
            Ruling::Refuse { rule, message } => write!(f, "Refuse({rule}: {message})"),
            Ruling::Wait(_) => f.write_str("Wait"),
        }
    }
}

pub type Judge = Box<dyn FnMut(&ToolCall) -> Ruling + Send + Sync>;

/// What a step of the guard lets out.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Bytes to send now (possibly none, while a call is held).
    Pass(Vec<u8>),
    /// A call is held for a human: send these bytes, then wait with
    /// `poll_wait` before pushing more.
    Wait(Vec<u8>),
    /// A call was blocked: send these bytes (the error event) and end.
    Blocked {
        out: Vec<u8>,
        call: ToolCall,
        rule: String,
        message: String,
    },
}

struct Building {
    id: String,
    name: String,
    arguments: String,
    /// Anthropic's `tool_use` start carries `input` ({} when streamed).
    initial: Option<String>,
}

/// Most bytes held while calls are open; past it the stream fails
/// (a call that never ends must not buffer without bound).
const MAX_HELD: usize = 4 << 20;
/// Most bytes of a JSON answer held to be judged whole; past it the
/// answer is refused, not passed unjudged (padding must not hide a call).
const MAX_DOCUMENT: usize = 16 << 20;

pub struct ToolGuard {
    judge: Judge,
    /// A whole JSON answer (not streamed): held entirely, judged at its end.
    document: bool,
    /// Bytes of an event not yet complete.
    partial: Vec<u8>,
    /// Whole events held while a call is open, in order.
    held: Vec<u8>,
    open: BTreeMap<String, Building>,
    /// Calls judged, in order.
    pub judged: Vec<ToolCall>,
    /// A call held for a human (the wait, the call, the calls still to
    /// judge after it); std's Mutex makes the guard Sync for hyper.
    #[allow(clippy::type_complexity)]
    waiting: Option<(
        std::sync::Mutex<Pin<Box<dyn Future<Output = Ruling> + Send>>>,
        ToolCall,
        Vec<String>,
    )>,
    /// The stream ended while a call waited: finish once it is decided.
    finish_after: bool,
    api: Option<Api>,
    blocked: bool,
    seq: u64,
    /// Anthropic: the content block index of the last tool call opened
    /// (a refusal text takes its place).
    block_index: Option<u64>,
}

impl ToolGuard {
    /// A guard over a JSON document answer instead of an event stream.
    pub fn document(judge: Judge) -> Self {
        Self {
            document: true,
            ..Self::new(judge)
        }
    }

    pub fn new(judge: Judge) -> Self {
        Self {
            judge,
            document: false,
            partial: Vec::new(),
            held: Vec::new(),
            open: BTreeMap::new(),
            judged: Vec::new(),
            waiting: None,
            finish_after: false,
            api: None,
            blocked: false,
            seq: 0,
            block_index: None,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) -> Step {
        if self.blocked {
            return Step::Pass(Vec::new());
        }
        self.partial.extend_from_slice(bytes);
        if self.waiting.is_some() {
            return Step::Pass(Vec::new());
        }
        if self.document {
            if self.partial.len() > MAX_DOCUMENT {
                return self.fail("a JSON answer grew past the node's limit for tool calls");
            }
            return Step::Pass(Vec::new());
        }
        let mut out = Vec::new();
        while let Some(end) = event_end(&self.partial) {
            let event: Vec<u8> = self.partial.drain(..end).collect();
            if let Some(step) = self.event(&event, &mut out) {
                return step;
            }
        }
        if self.held.len() + self.partial.len() > MAX_HELD {
            return self.fail("a tool call grew past the node's limit before it ended");
        }
        Step::Pass(out)
    }

    /// End of the stream: calls still open are whole now.
    pub fn finish(&mut self) -> Step {
        if self.blocked {
            return Step::Pass(Vec::new());
        }
        if self.waiting.is_some() {
            self.finish_after = true;
            return Step::Pass(Vec::new());
        }
        if self.document {
            let doc = std::mem::take(&mut self.partial);
            return self.judge_document(doc);
        }
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.partial);
        if !rest.is_empty() {
            if let Some(step) = self.event(&rest, &mut out) {
                return step;
            }
        }
        let keys: Vec<String> = self.open.keys().cloned().collect();
        if let Some(step) = self.close(&keys, &mut out) {
            return step;
        }
        Step::Pass(out)
    }

    /// One whole event: followed, then passed on or held.
    fn event(&mut self, event: &[u8], out: &mut Vec<u8>) -> Option<Step> {
        let (name, data) = parse_event(event);
        let value: Option<Value> = data.as_deref().and_then(|d| serde_json::from_str(d).ok());
        let mut closing = Vec::new();
        let mut done = data.as_deref() == Some("[DONE]");
        if let Some(v) = &value {
            if let Some(s) = v.get("sequence_number").and_then(Value::as_u64) {
                self.seq = s;
            }
            self.follow(name.as_deref(), v, &mut closing, &mut done);
        }
        if self.open.is_empty() && closing.is_empty() && self.held.is_empty() {
            out.extend_from_slice(event);
            return None;
        }
        self.held.extend_from_slice(event);
        if done {
            closing = self.open.keys().cloned().collect();
        }
        if !closing.is_empty() {
            if let Some(step) = self.close(&closing, out) {
                return Some(step);
            }
        }
        None
    }

    /// Judges the calls in `keys` (now whole); when none is left open,
    /// releases what was held.
    fn close(&mut self, keys: &[String], out: &mut Vec<u8>) -> Option<Step> {
        for (n, k) in keys.iter().enumerate() {
            let Some(b) = self.open.remove(k) else {
                continue;
            };
            let arguments = if b.arguments.is_empty() {
                b.initial.unwrap_or_else(|| "{}".into())
            } else {
                b.arguments
            };
            let call = ToolCall {
                api: self.api.unwrap_or(Api::OpenaiChat),
                id: b.id,
                name: b.name,
                arguments,
            };
            let ruling = (self.judge)(&call);
            if let Some(step) = self.apply(call, ruling, &keys[n + 1..], out) {
                return Some(step);
            }
        }
        if self.open.is_empty() && self.waiting.is_none() {
            out.append(&mut self.held);
        }
        None
    }

    /// What a ruling on `call` means for the stream; `rest`: the calls
    /// still to judge after it (kept while it waits).
    fn apply(
        &mut self,
        call: ToolCall,
        ruling: Ruling,
        rest: &[String],
        out: &mut Vec<u8>,
    ) -> Option<Step> {
        let ruling_kind = match &ruling {
            Ruling::Refuse { .. } => RulingKind::Refuse,
            _ => RulingKind::Other,
        };
        match ruling {
            Ruling::Allow => {
                self.judged.push(call);
                None
            }
            Ruling::Wait(f) => {
                self.waiting = Some((std::sync::Mutex::new(f), call, rest.to_vec()));
                Some(Step::Wait(std::mem::take(out)))
            }
            Ruling::Block { rule, message } | Ruling::Refuse { rule, message } => {
                let text = matches!(ruling_kind, RulingKind::Refuse);
                self.judged.push(call.clone());
                self.blocked = true;
                self.held.clear();
                self.open.clear();
                let mut bytes = std::mem::take(out);
                match refusal_events(call.api, &call, &message, self.block_index).filter(|_| text) {
                    Some(r) => bytes.extend(r),
                    None => bytes.extend(error_event(call.api, &call, &message, self.seq + 1)),
                }
                Some(Step::Blocked {
                    out: bytes,
                    call,
                    rule,
                    message,
                })
            }
        }
    }

    /// Whether a call waits for a human (`poll_wait` before more).
    pub fn is_waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// Waits for the held call's decision, then goes on as `push` would.
    pub fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        let ruling = match &self.waiting {
            None => return Poll::Ready(Step::Pass(Vec::new())),
            Some((f, _, _)) => {
                let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                match f.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                }
            }
        };
        let Some((_, call, rest)) = self.waiting.take() else {
            return Poll::Ready(Step::Pass(Vec::new()));
        };
        let mut out = Vec::new();
        if let Some(step) = self.apply(call, ruling, &rest, &mut out) {
            return Poll::Ready(step);
        }
        if let Some(step) = self.close(&rest, &mut out) {
            return Poll::Ready(step);
        }
        // What arrived while it waited, then the end if it came.
        let mut steps = vec![self.push(&[])];
        if self.finish_after && self.waiting.is_none() {
            self.finish_after = false;
            steps.push(self.finish());
        }
        for step in steps {
            match step {
                Step::Pass(b) => out.extend(b),
                Step::Wait(b) => {
                    out.extend(b);
                    return Poll::Ready(Step::Wait(out));
                }
                Step::Blocked {
                    out: b,
                    call,
                    rule,
                    message,
                } => {
                    out.extend(b);
                    return Poll::Ready(Step::Blocked {
                        out,
                        call,
                        rule,
                        message,
                    });
                }
            }
        }
        Poll::Ready(Step::Pass(out))
    }

    /// A whole JSON answer: its tool calls judged; a blocked one is
    /// replaced by a text the agent reads as a refusal (the status line
    /// went out already), the answer otherwise unchanged.
    fn judge_document(&mut self, doc: Vec<u8>) -> Step {
        let Ok(mut v) = serde_json::from_slice::<Value>(&doc) else {
            return Step::Pass(doc);
        };
        let mut blocked = None;
        for (call, at) in document_calls(&v) {
            let ruling = match (self.judge)(&call) {
                // A whole answer is not held for a human (its client
                // waits on one response): approval refuses it here.
                Ruling::Wait(_) => Ruling::Block {
                    rule: "approval-needs-a-stream".into(),
                    message: "this tool call needs an approval, which only a streamed answer can wait for".into(),
                },
                r => r,
            };
            self.judged.push(call.clone());
            if let Ruling::Block { rule, message } | Ruling::Refuse { rule, message } = ruling {
                refuse_in_document(&mut v, &at, &call, &message);
                blocked.get_or_insert((call, rule, message));
            }
        }
        match blocked {
            None => Step::Pass(doc),
            Some((call, rule, message)) => {
                self.blocked = true;
                Step::Blocked {
                    out: serde_json::to_vec(&v).unwrap_or(doc),
                    call,
                    rule,
                    message,
                }
            }
        }
    }

    fn fail(&mut self, message: &str) -> Step {
        let call = ToolCall {
            api: self.api.unwrap_or(Api::OpenaiChat),
            id: String::new(),
            name: self
                .open
                .values()
                .next()
                .map(|b| b.name.clone())
                .unwrap_or_default(),
            arguments: String::new(),
        };
        self.blocked = true;
        self.held.clear();
        self.open.clear();
        self.partial.clear();
        // Nothing of a document went out: the body is the error alone.
        let out = if self.document {
            json!({"error": {"message": format!("Sluice: {message}"), "type": "tool_call_blocked",
                "code": "sluice_policy"}})
            .to_string()
            .into_bytes()
        } else {
            error_event(call.api, &call, message, self.seq + 1)
        };
        Step::Blocked {
            out,
            call,
            rule: "tool-call-too-large".into(),
            message: message.into(),
        }
    }

    /// Follows one event of any of the three APIs.
    fn follow(
        &mut self,
        name: Option<&str>,
        v: &Value,
        closing: &mut Vec<String>,
        done: &mut bool,
    ) {
        match v.get("type").and_then(Value::as_str).or(name) {
            Some(k) if k.starts_with("content_block_") || k == "message_stop" => {
                self.follow_anthropic(k, v, closing, done)
            }
            Some(k) if k.starts_with("response.") => self.follow_responses(k, v, closing, done),
            _ => self.follow_chat(v, closing),
        }
    }

    /// Anthropic Messages: `content_block_*` events by block index.
    fn follow_anthropic(
        &mut self,
        kind: &str,
        v: &Value,
        closing: &mut Vec<String>,
        done: &mut bool,
    ) {
        match kind {
            "content_block_start" => {
                let block = &v["content_block"];
                if matches!(block["type"].as_str(), Some("tool_use" | "server_tool_use")) {
                    self.api = Some(Api::Anthropic);
                    let idx = v["index"].as_u64().unwrap_or(0);
                    self.block_index.get_or_insert(idx);
                    let initial = block
                        .get("input")
                        .filter(|i| i.as_object().is_none_or(|o| !o.is_empty()))
                        .map(|i| i.to_string());
                    self.open.insert(
                        format!("a{idx}"),
                        Building {
                            id: block["id"].as_str().unwrap_or_default().into(),
                            name: block["name"].as_str().unwrap_or_default().into(),
                            arguments: String::new(),
                            initial,
                        },
                    );
                }
            }
            "content_block_delta" => {
                let key = format!("a{}", v["index"].as_u64().unwrap_or(0));
                if let (Some(b), Some(piece)) =
                    (self.open.get_mut(&key), v["delta"]["partial_json"].as_str())
                {
                    b.arguments.push_str(piece);
                }
            }
            "content_block_stop" => {
                let key = format!("a{}", v["index"].as_u64().unwrap_or(0));
                if self.open.contains_key(&key) {
                    closing.push(key);
                }
            }
            "message_stop" => *done = true,
            _ => {}
        }
    }

    /// OpenAI Responses: `response.*` events by item id.
    fn follow_responses(
        &mut self,
        kind: &str,
        v: &Value,
        closing: &mut Vec<String>,
        done: &mut bool,
    ) {
        match kind {
            "response.output_item.added" => {
                let item = &v["item"];
                if matches!(
                    item["type"].as_str(),
                    Some("function_call" | "custom_tool_call" | "mcp_call" | "local_shell_call")
                ) {
                    self.api = Some(Api::OpenaiResponses);
                    let id = item["id"].as_str().unwrap_or_default().to_owned();
                    let arguments = item["arguments"]
                        .as_str()
                        .map(str::to_owned)
                        .or_else(|| item.get("action").map(Value::to_string))
                        .unwrap_or_default();
                    self.open.insert(
                        format!("r{id}"),
                        Building {
                            id: item["call_id"].as_str().unwrap_or(&id).into(),
                            name: item["name"]
                                .as_str()
                                .unwrap_or(item["type"].as_str().unwrap_or_default())
                                .into(),
                            arguments,
                            initial: None,
                        },
                    );
                }
            }
            "response.function_call_arguments.delta" | "response.custom_tool_call_input.delta" => {
                let key = format!("r{}", v["item_id"].as_str().unwrap_or_default());
                if let (Some(b), Some(piece)) = (self.open.get_mut(&key), v["delta"].as_str()) {
                    b.arguments.push_str(piece);
                }
            }
            "response.function_call_arguments.done" => {
                let key = format!("r{}", v["item_id"].as_str().unwrap_or_default());
                if let Some(b) = self.open.get_mut(&key) {
                    if let Some(a) = v["arguments"].as_str() {
                        b.arguments = a.to_owned();
                    }
                    closing.push(key);
                }
            }
            "response.output_item.done" => {
                let key = format!("r{}", v["item"]["id"].as_str().unwrap_or_default());
                if self.open.contains_key(&key) {
                    closing.push(key);
                }
            }
            "response.completed" | "response.failed" | "response.incomplete" => *done = true,
            _ => {}
        }
    }

    /// OpenAI chat completions: no `type`, `choices[].delta`.
    fn follow_chat(&mut self, v: &Value, closing: &mut Vec<String>) {
        let Some(choices) = v["choices"].as_array() else {
            return;
        };
        for ch in choices {
            let c = ch["index"].as_u64().unwrap_or(0);
            if let Some(calls) = ch["delta"]["tool_calls"].as_array() {
                self.api = Some(Api::OpenaiChat);
                for (n, t) in calls.iter().enumerate() {
                    let i = t["index"].as_u64().unwrap_or(n as u64);
                    let b = self.open.entry(format!("c{c}.{i}")).or_insert(Building {
                        id: String::new(),
                        name: String::new(),
                        arguments: String::new(),
                        initial: None,
                    });
                    if let Some(id) = t["id"].as_str() {
                        b.id = id.into();
                    }
                    if let Some(name) = t["function"]["name"].as_str() {
                        b.name.push_str(name);
                    }
                    if let Some(a) = t["function"]["arguments"].as_str() {
                        b.arguments.push_str(a);
                    }
                }
            }
            if !ch["finish_reason"].is_null() {
                let prefix = format!("c{c}.");
                closing.extend(self.open.keys().filter(|k| k.starts_with(&prefix)).cloned());
            }
        }
    }
}

enum RulingKind {
    Refuse,
    Other,
}

/// A refusal the agent reads as the answer's last text, closing the
/// stream as the API does: OpenAI chat (a content delta, `stop`,
/// `[DONE]`) and Anthropic (a text block where the call's block was,
/// `end_turn`). Other APIs: `None` (they get the error event).
fn refusal_events(api: Api, call: &ToolCall, message: &str, index: Option<u64>) -> Option<Vec<u8>> {
    let text = format!("Sluice blocked the tool call `{}`: {message}", call.name);
    let out = match api {
        Api::OpenaiChat => format!(
            "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
            json!({"id": "sluice-refusal", "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]}),
            json!({"id": "sluice-refusal", "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        ),
        Api::Anthropic => {
            let i = index.unwrap_or(0);
            [
                (
                    "content_block_start",
                    json!({"type": "content_block_start", "index": i,
                    "content_block": {"type": "text", "text": ""}}),
                ),
                (
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i,
                    "delta": {"type": "text_delta", "text": text}}),
                ),
                (
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": i}),
                ),
                (
                    "message_delta",
                    json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": 0}}),
                ),
                ("message_stop", json!({"type": "message_stop"})),
            ]
            .iter()
            .map(|(e, d)| format!("event: {e}\ndata: {d}\n\n"))
            .collect()
        }
        Api::OpenaiResponses | Api::Mcp => return None,
    };
    Some(out.into_bytes())
}

/// Where a call sits in a JSON answer.
enum At {
    /// `choices[c].message.tool_calls[t]`
    Chat(usize, usize),
    /// `content[i]` (a `tool_use` block)
    Anthropic(usize),
    /// `output[i]` (a `function_call` item)
    Responses(usize),
}

fn document_calls(v: &Value) -> Vec<(ToolCall, At)> {
    let mut out = Vec::new();
    for (c, ch) in v["choices"].as_array().into_iter().flatten().enumerate() {
        for (t, tc) in ch["message"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            out.push((
                ToolCall {
                    api: Api::OpenaiChat,
                    id: tc["id"].as_str().unwrap_or_default().into(),
                    name: tc["function"]["name"].as_str().unwrap_or_default().into(),
                    arguments: tc["function"]["arguments"].as_str().unwrap_or("{}").into(),
                },
                At::Chat(c, t),
            ));
        }
    }
    if v["type"] == "message" {
        for (i, b) in v["content"].as_array().into_iter().flatten().enumerate() {
            if matches!(b["type"].as_str(), Some("tool_use" | "server_tool_use")) {
                out.push((
                    ToolCall {
                        api: Api::Anthropic,
                        id: b["id"].as_str().unwrap_or_default().into(),
                        name: b["name"].as_str().unwrap_or_default().into(),
                        arguments: b["input"].to_string(),
                    },
                    At::Anthropic(i),
                ));
            }
        }
    }
    if v["object"] == "response" {
        for (i, it) in v["output"].as_array().into_iter().flatten().enumerate() {
            if matches!(
                it["type"].as_str(),
                Some("function_call" | "custom_tool_call")
            ) {
                out.push((
                    ToolCall {
                        api: Api::OpenaiResponses,
                        id: it["call_id"].as_str().unwrap_or_default().into(),
                        name: it["name"].as_str().unwrap_or_default().into(),
                        arguments: it["arguments"]
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| it["input"].to_string()),
                    },
                    At::Responses(i),
                ));
            }
        }
    }
    out
}

/// Replaces the call at `at` by a refusal the agent reads as text.
fn refuse_in_document(v: &mut Value, at: &At, call: &ToolCall, message: &str) {
    let text = format!("Sluice blocked the tool call `{}`: {message}", call.name);
    match *at {
        At::Chat(c, t) => {
            let ch = &mut v["choices"][c];
            if let Some(calls) = ch["message"]["tool_calls"].as_array_mut() {
                if t < calls.len() {
                    calls.remove(t);
                }
                if calls.is_empty() {
                    if let Some(m) = ch["message"].as_object_mut() {
                        m.remove("tool_calls");
                    }
                }
            }
            ch["message"]["content"] = json!(text);
            ch["finish_reason"] = json!("stop");
        }
        At::Anthropic(i) => {
            v["content"][i] = json!({"type": "text", "text": text});
            v["stop_reason"] = json!("end_turn");
        }
        At::Responses(i) => {
            v["output"][i] = json!({"type": "message", "id": format!("msg_sluice_{i}"), "status": "completed",
                "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]});
        }
    }
}

/// Where the first whole event of `buf` ends (after its blank line).
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The `event:` name and the joined `data:` lines of one event.
fn parse_event(event: &[u8]) -> (Option<String>, Option<String>) {
    let text = String::from_utf8_lossy(event);
    let (mut name, mut data): (Option<String>, Option<String>) = (None, None);
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(v) = line.strip_prefix("event:") {
            name = Some(v.trim_start().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            let v = v.strip_prefix(' ').unwrap_or(v);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(v);
                }
                None => data = Some(v.to_owned()),
            }
        }
    }
    (name, data)
}

/// The error event each API's client raises on.
pub fn error_event(api: Api, call: &ToolCall, message: &str, seq: u64) -> Vec<u8> {
    let text = format!("Sluice blocked the tool call `{}`: {message}", call.name);
    match api {
        // openai-python raises APIError on a data object with `error`.
        Api::OpenaiChat | Api::Mcp => format!(
            "data: {}\n\n",
            json!({"error": {"message": text, "type": "tool_call_blocked", "code": "sluice_policy", "param": null}})
        ),
        Api::OpenaiResponses => format!(
            "event: error\ndata: {}\n\n",
            json!({"type": "error", "code": "sluice_policy", "message": text, "param": null,
                   "sequence_number": seq,
                   "error": {"message": text, "type": "tool_call_blocked", "code": "sluice_policy"}})
        ),
        // anthropic-python raises on an `error` event.
        Api::Anthropic => format!(
            "event: error\ndata: {}\n\n",
            json!({"type": "error", "error": {"type": "permission_error", "message": text}})
        ),
    }
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> ToolGuard {
        ToolGuard::new(Box::new(|c: &ToolCall| {
            if c.arguments.contains("rm -rf") {
                Ruling::Block {
                    rule: "no-rm".into(),
                    message: "destructive".into(),
                }
            } else {
                Ruling::Allow
            }
        }))
    }

    fn chat(delta: Value) -> String {
        format!(
            "data: {}\n\n",
            json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
        )
    }

    fn chat_stream(args: &str) -> Vec<String> {
        let mut ev = vec![chat(json!({"role": "assistant", "content": "Sure. "}))];
        ev.push(chat(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "run_terminal_cmd", "arguments": ""}}]}),
        ));
        for piece in args.as_bytes().chunks(4) {
            ev.push(chat(json!({"tool_calls": [{"index": 0, "function": {"arguments": String::from_utf8_lossy(piece)}}]})));
        }
        ev.push(format!(
            "data: {}\n\n",
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        ));
        ev.push("data: [DONE]\n\n".into());
        ev
    }

    fn run(g: &mut ToolGuard, events: &[String], cut: usize) -> (Vec<u8>, Option<String>) {
        let all: Vec<u8> = events.concat().into_bytes();
        let mut out = Vec::new();
        for piece in all.chunks(cut) {
            match g.push(piece) {
                Step::Pass(b) => out.extend(b),
                Step::Wait(_) => panic!("nothing waits in these tests"),
                Step::Blocked { out: b, rule, .. } => {
                    out.extend(b);
                    return (out, Some(rule));
                }
            }
        }
        match g.finish() {
            Step::Pass(b) => out.extend(b),
            Step::Wait(_) => panic!("nothing waits in these tests"),
            Step::Blocked { out: b, rule, .. } => {
                out.extend(b);
                return (out, Some(rule));
            }
        }
        (out, None)
    }

    #[test]
    fn an_openai_chat_call_split_across_deltas_is_judged_whole() {
        let ev = chat_stream(r#"{"command":"rm -rf ~"}"#);
        let (out, blocked) = run(&mut guard(), &ev, 7);
        assert_eq!(blocked.as_deref(), Some("no-rm"));
        let text = String::from_utf8(out).unwrap();
        // The text before the call went out; nothing of the call did.
        assert!(text.contains("Sure. "), "{text}");
        assert!(!text.contains("run_terminal_cmd\""), "{text}");
        assert!(
            text.contains("\"error\"") && text.contains("destructive"),
            "{text}"
        );
        // A harmless call passes byte for byte.
        let ev = chat_stream(r#"{"command":"ls -la"}"#);
        let mut g = guard();
        let (out, blocked) = run(&mut g, &ev, 5);
        assert_eq!(blocked, None);
        assert_eq!(out, ev.concat().into_bytes());
        assert_eq!(g.judged[0].arguments, r#"{"command":"ls -la"}"#);
        assert_eq!(g.judged[0].name, "run_terminal_cmd");
    }

    #[test]
    fn a_refusal_text_ends_the_stream_as_the_api_would() {
        let mut g = ToolGuard::new(Box::new(|_c: &ToolCall| Ruling::Refuse {
            rule: "r".into(),
            message: "not here".into(),
        }));
        let ev = chat_stream(r#"{"command":"npm publish"}"#);
        let (out, blocked) = run(&mut g, &ev, 8);
        assert_eq!(blocked.as_deref(), Some("r"));
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("\"error\""), "{text}");
        assert!(
            text.contains("Sluice blocked the tool call `run_terminal_cmd`: not here"),
            "{text}"
        );
        assert!(
            text.contains("\"finish_reason\":\"stop\"") && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
    }

    #[test]
    fn a_held_call_waits_then_goes_out_whole() {
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        let rx = std::sync::Mutex::new(rx);
        let mut g = ToolGuard::new(Box::new(move |_c: &ToolCall| {
            let allow = rx.lock().unwrap().recv().unwrap();
            Ruling::Wait(Box::pin(async move {
                if allow {
                    Ruling::Allow
                } else {
                    Ruling::Block {
                        rule: "hold".into(),
                        message: "denied".into(),
                    }
                }
            }))
        }));
        let ev = chat_stream(r#"{"command":"helm upgrade"}"#);
        let all = ev.concat().into_bytes();
        tx.send(true).unwrap();
        let mut out = Vec::new();
        let mut waited = false;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for piece in all.chunks(6) {
            if g.is_waiting() {
                waited = true;
                match g.poll_wait(&mut cx) {
                    Poll::Ready(Step::Pass(b)) => out.extend(b),
                    other => panic!("{other:?}"),
                }
            }
            match g.push(piece) {
                Step::Pass(b) | Step::Wait(b) => out.extend(b),
                Step::Blocked { .. } => panic!("blocked"),
            }
        }
        if let Step::Pass(b) | Step::Wait(b) = g.finish() {
            out.extend(b);
        }
        if g.is_waiting() {
            waited = true;
            match g.poll_wait(&mut cx) {
                Poll::Ready(Step::Pass(b)) => out.extend(b),
                other => panic!("{other:?}"),
            }
        }
        assert!(waited);
        assert_eq!(out, all, "everything, in order, once allowed");
    }

    #[test]
    fn a_json_answer_gets_a_refusal_in_place_of_a_blocked_call() {
        let doc = json!({"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0,
            "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "run_terminal_cmd", "arguments": "{\"command\":\"rm -rf ~\"}"}}]}}]})
        .to_string();
        let mut g = ToolGuard::document(guard().judge);
        let mut out = Vec::new();
        for piece in doc.as_bytes().chunks(9) {
            match g.push(piece) {
                Step::Pass(b) => out.extend(b),
                other => panic!("{other:?}"),
            }
        }
        assert!(out.is_empty(), "a document is held whole");
        let Step::Blocked { out, rule, .. } = g.finish() else {
            panic!("blocked")
        };
        assert_eq!(rule, "no-rm");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert!(
            v["choices"][0]["message"].get("tool_calls").is_none(),
            "{v}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("destructive"));
        // An allowed one: the same bytes.
        let ok = doc.replace("rm -rf ~", "ls");
        let mut g = ToolGuard::document(guard().judge);
        assert_eq!(g.push(ok.as_bytes()), Step::Pass(Vec::new()));
        assert_eq!(g.finish(), Step::Pass(ok.into_bytes()));
    }

    #[test]
    fn anthropic_and_responses_calls_are_followed() {
        let ev = [
            format!(
                "event: message_start\ndata: {}\n\n",
                json!({"type": "message_start", "message": {}})
            ),
            format!(
                "event: content_block_start\ndata: {}\n\n",
                json!({"type": "content_block_start", "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {}}})
            ),
            format!(
                "event: content_block_delta\ndata: {}\n\n",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": "{\"command\": \"rm -"}})
            ),
            format!(
                "event: content_block_delta\ndata: {}\n\n",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": "rf /\"}"}})
            ),
            format!(
                "event: content_block_stop\ndata: {}\n\n",
                json!({"type": "content_block_stop", "index": 1})
            ),
            format!(
                "event: message_stop\ndata: {}\n\n",
                json!({"type": "message_stop"})
            ),
        ];
        let (out, blocked) = run(&mut guard(), &ev, 3);
        assert_eq!(blocked.as_deref(), Some("no-rm"));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("event: message_start"), "{text}");
        assert!(
            text.contains("event: error") && text.contains("permission_error"),
            "{text}"
        );

        let ev = [
            format!(
                "event: response.output_item.added\ndata: {}\n\n",
                json!({"type": "response.output_item.added",
                "sequence_number": 3, "item": {"id": "fc_1", "type": "function_call", "call_id": "call_9", "name": "shell", "arguments": ""}})
            ),
            format!(
                "event: response.function_call_arguments.delta\ndata: {}\n\n",
                json!({"type": "response.function_call_arguments.delta",
                "item_id": "fc_1", "delta": "{\"cmd\":\"ls\"}"})
            ),
            format!(
                "event: response.function_call_arguments.done\ndata: {}\n\n",
                json!({"type": "response.function_call_arguments.done",
                "item_id": "fc_1", "arguments": "{\"cmd\":\"ls\"}"})
            ),
            format!(
                "event: response.completed\ndata: {}\n\n",
                json!({"type": "response.completed"})
            ),
        ];
        let mut g = guard();
        let (out, blocked) = run(&mut g, &ev, 11);
        assert_eq!(blocked, None);
        assert_eq!(out, ev.concat().into_bytes());
        assert_eq!(g.judged[0].id, "call_9");
        assert_eq!(g.judged[0].api, Api::OpenaiResponses);
    }
}
