//! Tool calls in model answers, judged on the wire before the agent sees
//! them: the real `openai` (chat, streamed and not; Responses) and
//! `anthropic` clients asking the fake API (in the test's namespace) for an
//! answer that is a tool call, its arguments streamed a few characters a
//! delta. The `agent` pack blocks `rm -rf ~`; `ls -la` passes untouched.
use std::path::Path;

use serde_json::Value;

use crate::harness::*;

fn bundle(version: u64, _dir: &Path) -> String {
    format!(
        r#"version: {version}
name: e2e-tools
rules:
  - id: agent-guard
    on: tool_call
    targets: [fake-api]
    packs: [agent]
    action: block
    message: Not on a CI runner.
  - id: no-publishing
    on: tool_call
    targets: [fake-api]
    tools: ["publish_*"]
    action: block
    refusal: text
    message: Publishing is for the release pipeline.
  - id: every-tool-call
    on: tool_call
    targets: [fake-api]
    tools: ["*"]
    action: log
"#
    )
}

/// The same, and deployments held for a human (5 s to decide).
fn approve_bundle(version: u64, dir: &Path) -> String {
    format!(
        r#"{}  - id: hold-deploys
    on: tool_call
    targets: [fake-api]
    tools: ["deploy_*"]
    action: approve
    timeout_secs: 5
"#,
        bundle(version, dir)
    )
}

struct Agent {
    _trust: TrustGuard,
    p: PolicyEnv,
}

impl Agent {
    fn new() -> Self {
        Self::with(bundle)
    }

    fn with(bundle: fn(u64, &Path) -> String) -> Self {
        let mut p = PolicyEnv::with_policy(bundle);
        p.env.remote.start_ai();
        let _trust = p.env.trust_node_ca();
        Agent { _trust, p }
    }

    fn call(&self, mode: &str, tool: &str, args: &str, stream: bool) -> Value {
        let out = self.command(mode, tool, args, stream).output().unwrap();
        parse_json_output(&out, &self.p.env.node)
    }

    /// The client as a job, not yet waited for.
    fn command(&self, mode: &str, tool: &str, args: &str, stream: bool) -> std::process::Command {
        let script = format!("{FIXTURES}/ai_client.py");
        let ip = self.p.env.remote.remote.clone();
        let spec = format!("{tool}={args}");
        let mut argv = vec![
            script.as_str(),
            "--ip",
            ip.as_str(),
            mode,
            "",
            "--tool",
            spec.as_str(),
            "--step",
            "3",
            "--delay",
            "0",
        ];
        if stream {
            argv.push("--stream");
        }
        let mut cmd = self.p.env.cgroup.command("python3", &argv);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    }
}

const RM: &str = r#"{"command": "rm -rf ~"}"#;
const LS: &str = r#"{"command": "ls -la"}"#;

#[test]
fn tool_calls_are_judged_whole_before_the_agent_sees_them() {
    let a = Agent::new();
    for (mode, stream) in [
        ("openai-chat", true),
        ("openai-chat", false),
        ("openai-responses", true),
        ("anthropic", true),
        ("anthropic", false),
    ] {
        let how = format!("{mode} stream={stream}");
        // Harmless: the agent gets the call exactly as the model sent it.
        let ok = a.call(mode, "run_terminal_cmd", LS, stream);
        assert!(ok["error"].is_null(), "{how}: {ok:#}");
        assert_eq!(
            ok["tool_calls"][0]["name"], "run_terminal_cmd",
            "{how}: {ok:#}"
        );
        let args: Value =
            serde_json::from_str(ok["tool_calls"][0]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args["command"], "ls -la", "{how}");

        // Destructive: no part of the call reaches the agent.
        let bad = a.call(mode, "run_terminal_cmd", RM, stream);
        let calls = bad["tool_calls"].as_array().cloned().unwrap_or_default();
        assert!(
            calls
                .iter()
                .all(|c| !c["arguments"].as_str().unwrap_or("").contains("rm")),
            "{how}: the call reached the agent: {bad:#}"
        );
        if stream {
            // The library raises the API's own error, naming the reason.
            let err = bad["error"].as_str().unwrap_or_default();
            assert!(
                err.contains("Sluice blocked the tool call `run_terminal_cmd`")
                    && err.contains("Not on a CI runner."),
                "{how}: {bad:#}"
            );
        } else {
            // A whole answer: the call is replaced by a refusal it reads.
            assert!(bad["error"].is_null(), "{how}: {bad:#}");
            assert!(
                bad["text"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("Sluice blocked the tool call"),
                "{how}: {bad:#}"
            );
            assert!(calls.is_empty(), "{how}: {bad:#}");
        }
    }
    // The text before a blocked call in a stream still arrived.
    let bad = a.call("openai-chat", "run_terminal_cmd", RM, true);
    assert_eq!(bad["text"], "On it. ", "{bad:#}");

    // `refusal: text`: the stream ends normally with a refusal the agent
    // reads, no exception, no call.
    for mode in ["openai-chat", "anthropic"] {
        let got = a.call(mode, "publish_package", LS, true);
        assert!(got["error"].is_null(), "{mode}: {got:#}");
        assert!(
            got["tool_calls"].as_array().unwrap().is_empty(),
            "{mode}: {got:#}"
        );
        let text = got["text"].as_str().unwrap_or_default();
        assert!(
            text.contains("Sluice blocked the tool call `publish_package`: Publishing is for the release pipeline."),
            "{mode}: {got:#}"
        );
    }

    // Records: every call with its verdict, the blocking rule, the log rule.
    let exchanges = exchanges(&a.p.env);
    let calls: Vec<&Value> = exchanges
        .iter()
        .flat_map(|e| e["tool_calls"].as_array().into_iter().flatten())
        .collect();
    let blocked: Vec<&&Value> = calls.iter().filter(|c| c["verdict"] == "blocked").collect();
    let allowed: Vec<&&Value> = calls.iter().filter(|c| c["verdict"] == "allowed").collect();
    assert_eq!(blocked.len(), 8, "{calls:#?}");
    assert_eq!(allowed.len(), 5, "{calls:#?}");
    assert!(blocked
        .iter()
        .filter(|c| c["name"] == "run_terminal_cmd")
        .all(
            |c| c["rule"] == "agent-guard" && c["arguments"].as_str().unwrap().contains("rm -rf ~")
        ));
    assert_eq!(
        blocked
            .iter()
            .filter(|c| c["rule"] == "no-publishing")
            .count(),
        2,
        "{calls:#?}"
    );
    assert!(exchanges.iter().any(|e| e["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|d| d["rule"] == "every-tool-call" && d["action"] == "log")));
    let id = a.p.env.node.sessions()[0]["id"].to_string();
    let replay = text(&a.p.env.node.cli(&["sessions", "replay", &id]));
    assert!(replay.contains("tool call"), "{replay}");
}

/// The MCP server, killed with the test.
struct McpServer(std::process::Child);

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const MCP_PORT: u16 = 4443;

fn start_mcp(env: &Env, log: &Path) -> McpServer {
    let dir = env.remote.https_ca.parent().unwrap().to_owned();
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &env.remote.ns, "python3"])
        .arg(format!("{FIXTURES}/mcp_server.py"))
        .args([
            "--bind",
            &env.remote.remote,
            "--port",
            &MCP_PORT.to_string(),
        ])
        .arg("--cert")
        .arg(dir.join("api.crt"))
        .arg("--key")
        .arg(dir.join("api.key"))
        .arg("--log")
        .arg(log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start the MCP server");
    let ip = env.remote.remote.clone();
    wait_for("MCP server", || {
        std::net::TcpStream::connect((ip.as_str(), MCP_PORT)).is_ok()
    });
    McpServer(child)
}

/// A real MCP client and server (the `mcp` SDK, streamable HTTP): a
/// `tools/call` of `shell` with `rm -rf ~` is answered by the node with a
/// JSON-RPC error the client raises, and the server never sees it; a
/// harmless call, and listing the tools, pass.
#[test]
fn mcp_tool_calls_are_judged_before_the_server_runs_them() {
    let a = Agent::new();
    let env = &a.p.env;
    let log = env.dir.path().join("mcp.log");
    std::fs::write(&log, "").unwrap();
    let _server = start_mcp(env, &log);
    let call = |tool: &str, args: &str| {
        let script = format!("{FIXTURES}/mcp_client.py");
        let ip = env.remote.remote.clone();
        let port = MCP_PORT.to_string();
        let out = env.cgroup.run(
            "python3",
            &[&script, "--ip", &ip, "--port", &port, tool, args],
        );
        parse_json_output(&out, &env.node)
    };
    let ran = || -> Vec<Value> {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };

    let ok = call("shell", LS);
    assert!(ok["error"].is_null(), "{ok:#}");
    assert_eq!(ok["tools"], serde_json::json!(["echo", "shell"]), "{ok:#}");
    assert_eq!(ok["result"], "ran: ls -la", "{ok:#}");
    assert_eq!(ran().len(), 1);

    let bad = call("shell", RM);
    let said = format!(
        "{} {}",
        bad["error"].as_str().unwrap_or_default(),
        bad["result"].as_str().unwrap_or_default()
    );
    assert!(
        said.contains("Sluice blocked the tool call `shell`")
            && said.contains("Not on a CI runner."),
        "the client must see the refusal: {bad:#}"
    );
    assert_eq!(
        ran().len(),
        1,
        "the server ran the blocked call: {:?}",
        ran()
    );

    // Recorded: the call, blocked by the agent pack's rule.
    let calls: Vec<Value> = exchanges(env)
        .iter()
        .flat_map(|e| e["tool_calls"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(
        calls.iter().any(|c| c["api"] == "mcp"
            && c["name"] == "shell"
            && c["verdict"] == "blocked"
            && c["rule"] == "agent-guard"),
        "{calls:#?}"
    );
    assert!(
        calls.iter().any(|c| c["api"] == "mcp"
            && c["verdict"] == "allowed"
            && c["result"] == "ran: ls -la"),
        "the allowed call's result is recorded: {calls:#?}"
    );
    // And exported: the HAR carries the calls.
    let exported = env.node.sessions().iter().any(|s| {
        let id = s["id"].to_string();
        let har = env
            .node
            .cli(&["sessions", "export", &id, "--format", "har"]);
        let har: Value = serde_json::from_slice(&har.stdout).unwrap_or_default();
        har["log"]["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["_toolCalls"][0]["verdict"] == "blocked")
    });
    assert!(exported, "no HAR export carries the blocked call");
}

fn pending(env: &Env, tool: &str) -> Option<Value> {
    env.node
        .cli_json(&["approvals", "list", "--json"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .find(|a| a["path"] == tool)
}

/// An `approve` rule holds a streamed tool call (the stream waits, the
/// call is not delivered) until a human decides from the CLI: approved,
/// the agent gets the call exactly; denied, the library raises the error;
/// no decision in time is a denial. MCP calls are held the same way.
#[test]
fn tool_calls_held_for_approval_wait_for_a_human() {
    let a = Agent::with(approve_bundle);
    let env = &a.p.env;
    let args = r#"{"command": "helm upgrade api ./chart"}"#;
    for (decision, mode) in [("approve", "openai-chat"), ("deny", "anthropic")] {
        let child = a
            .command(mode, "deploy_service", args, true)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        let held = loop {
            if let Some(p) = pending(env, "deploy_service") {
                break p;
            }
            assert!(std::time::Instant::now() < deadline, "{mode}: never held");
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert_eq!(held["rule"], "hold-deploys");
        assert!(
            held["preview"].as_str().unwrap().contains("helm upgrade"),
            "{held:#}"
        );
        let id = held["id"].to_string();
        let out = if decision == "approve" {
            env.node.cli(&["approvals", "approve", &id])
        } else {
            env.node
                .cli(&["approvals", "deny", &id, "--reason", "change freeze"])
        };
        assert!(out.status.success(), "{}", text(&out));
        let got = parse_json_output(&child.wait_with_output().unwrap(), &env.node);
        if decision == "approve" {
            assert!(got["error"].is_null(), "{mode}: {got:#}");
            assert_eq!(got["tool_calls"][0]["name"], "deploy_service", "{got:#}");
            let v: Value =
                serde_json::from_str(got["tool_calls"][0]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(v["command"], "helm upgrade api ./chart");
        } else {
            let err = got["error"].as_str().unwrap_or_default();
            assert!(err.contains("change freeze"), "{mode}: {got:#}");
            assert!(got["tool_calls"].as_array().unwrap().is_empty(), "{got:#}");
        }
    }
    // Nobody decides: denied after the rule's 5 s.
    let got = a.call("openai-chat", "deploy_service", args, true);
    assert!(
        got["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no approval within 5s"),
        "{got:#}"
    );
    let calls: Vec<Value> = exchanges(env)
        .iter()
        .flat_map(|e| e["tool_calls"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["name"] == "deploy_service")
        .collect();
    let verdicts: Vec<&str> = calls
        .iter()
        .map(|c| c["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(
        verdicts.iter().filter(|v| **v == "allowed").count(),
        1,
        "{calls:#?}"
    );
    assert_eq!(
        verdicts.iter().filter(|v| **v == "blocked").count(),
        2,
        "{calls:#?}"
    );
}
