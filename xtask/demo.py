#!/usr/bin/env python3
"""`cargo xtask demo`: Sluice's main job, on this machine alone.

1. A fake AI API (tests/fixtures/fake_ai.py, OpenAI-shaped streaming) runs
   in a network namespace this script creates (10.214.0.2), with a test CA
   made here (openssl; nothing is committed or sent anywhere else).
2. The node starts on the example policy (mask secrets in `cursor-api`
   answers), watching the cgroup `sluice-demo-job`; the fake API is that
   target, intercepted by name.
3. A "build job" in the watched cgroup uses the real `openai` library to
   stream an answer that contains a GitHub token and an AWS key, a few
   characters per event. It was not reconfigured: it trusts the system
   store and connects to the API's address.
4. The masked answer is printed as it arrives. Then the model answers with
   a tool call, `rm -rf ~` streamed a few characters a delta: the node
   holds it back whole, the agent pack blocks it and the openai library
   raises the error the node sent. The sessions are listed, replayed and
   verified. Everything is removed at the end.
Needs root.
"""
import argparse
import json
import socket
import urllib.request
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "bench"))
from common import cgroup2_root, sh  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS, HOST_IF, PEER_IF = "sluice-demo-net", "sdemo0", "sdemo1"
HOST_IP, API_IP = "10.214.0.1", "10.214.0.2"
CGROUP = "sluice-demo-job"
NAME = "api.demo.test"


def step(msg):
    print(f"\n\033[1m==> {msg}\033[0m", flush=True)


def run(cmd, **kw):
    print(f"$ {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, **kw)


def make_certs(d):
    ca_key, ca = f"{d}/demo-ca.key", f"{d}/demo-ca.pem"
    key, csr, crt = f"{d}/api.key", f"{d}/api.csr", f"{d}/api.crt"
    q = dict(check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
                    "-subj", "/CN=Sluice demo upstream CA"], **q)
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", csr, "-subj", f"/CN={NAME}"], **q)
    ext = f"{d}/ext.cnf"
    with open(ext, "w") as f:
        f.write(f"subjectAltName=DNS:{NAME}\n")
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                    "-out", crt, "-days", "1", "-extfile", ext], **q)
    with open(crt, "a") as f, open(ca) as c:
        f.write(c.read())
    return ca, crt, key


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sluice", required=True)
    p.add_argument("--console", help="sluice-console binary: the demo's evidence goes to it too")
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("cargo xtask demo needs root (eBPF, cgroups, a network namespace)")
    sluice = a.sluice
    work = tempfile.mkdtemp(prefix="sluice-demo-")
    cg = os.path.join(cgroup2_root(), CGROUP)
    procs = []
    cfg = f"{work}/sluice.yaml"
    state = f"{work}/state"
    sock = f"{work}/control.sock"
    cli = [sluice, "--socket", sock]
    try:
        step("A fake AI API in its own network namespace")
        sh(f"ip netns del {NS}", check=False)
        sh(f"ip link del {HOST_IF}", check=False)
        sh(f"ip netns add {NS}")
        sh(f"ip link add {HOST_IF} type veth peer name {PEER_IF}")
        sh(f"ip link set {PEER_IF} netns {NS}")
        sh(f"ip addr add {HOST_IP}/24 dev {HOST_IF} && ip link set {HOST_IF} up")
        sh(f"ip netns exec {NS} sh -c 'ip link set lo up && ip addr add {API_IP}/24 dev {PEER_IF} "
           f"&& ip link set {PEER_IF} up'")
        ca, crt, key = make_certs(work)
        api_log = f"{work}/api.log"
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", NS, sys.executable, f"{ROOT}/tests/fixtures/fake_ai.py", "--bind", API_IP,
             "--cert", crt, "--key", key, "--log", api_log, "--delay", "0.03"],
            stderr=subprocess.DEVNULL))
        print(f"fake API at https://{NAME}:7443 ({API_IP}), streaming OpenAI chat completions")

        console_url = None
        ship = ""
        if a.console:
            step("A local NATS JetStream and the console (loopback only)")
            nats_port, console_port = free_port(), free_port()
            procs.append(subprocess.Popen(
                ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", f"{work}/nats"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            console_url = f"http://127.0.0.1:{console_port}"
            procs.append(subprocess.Popen(
                [a.console, "run", "--nats", f"nats://127.0.0.1:{nats_port}", "--listen",
                 f"127.0.0.1:{console_port}", "--state-dir", f"{work}/console"],
                stdout=subprocess.DEVNULL, stderr=open(f"{work}/console.log", "w")))
            ship = f"ship:\n  nats:\n    url: nats://127.0.0.1:{nats_port}\n    node: demo-node\n"
            print(f"console at {console_url}, evidence over nats://127.0.0.1:{nats_port}")

        step("The node, on the example policy (mask secrets in cursor-api answers)")
        with open(cfg, "w") as f:
            f.write(f"""proxy:
  port: 15099
watch:
  cgroups:
    - path: {CGROUP}
      create: true
  fail_closed: false
targets:
  - name: cursor-api
    addresses: ["{API_IP}"]
    ports: [7443]
    tls: intercept
    sni: [{NAME}]
tls:
  extra_upstream_roots: ["{ca}"]
{ship}""")
        node_log = open(f"{work}/sluice.log", "w")
        node = subprocess.Popen([*cli, "run", "--config", cfg, "--state-dir", state],
                                stderr=node_log, stdout=node_log)
        procs.append(node)
        for _ in range(300):
            if subprocess.run([*cli, "status"], capture_output=True).returncode == 0:
                break
            if node.poll() is not None:
                sys.exit(open(f"{work}/sluice.log").read())
            time.sleep(0.1)
        run([*cli, "ca", "install", "--config", cfg, "--state-dir", state], check=True,
            stdout=subprocess.DEVNULL)
        print(f"watching cgroup {CGROUP}; the node's CA is in the system trust store")

        step("A build job streams an answer with the openai library (secrets inside)")
        rnd = random.SystemRandom()
        token = "ghp_" + "".join(rnd.choice(string.ascii_letters + string.digits) for _ in range(36))
        aws = "AKIA" + "".join(rnd.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
        answer = (f"Sure! Set GITHUB_TOKEN={token} and AWS_ACCESS_KEY_ID={aws} "
                  "in your CI settings, then run the deploy step.")
        print(f"the API will send: {answer}")
        job = subprocess.run(
            ["sh", "-c", f"echo $$ > {cg}/cgroup.procs && exec \"$@\"", "sh", sys.executable,
             f"{ROOT}/tests/fixtures/ai_client.py", "--ip", API_IP, "--port", "7443", "--host", NAME,
             "--live", "openai-chat", answer, "--stream", "--step", "3"],
            stdout=subprocess.PIPE, text=True)
        out = json.loads(job.stdout.strip().splitlines()[-1])
        if out.get("error"):
            sys.exit(f"client error: {out['error']}")
        print(f"\nthe job received:  {out['text']}")
        print(f"events received:   {out['events']}")
        leaked = token in out["text"] or aws in out["text"]
        print(f"token reached the job: {'YES (bug!)' if leaked else 'no'}")

        step("The model tells the job's agent to run `rm -rf ~` (a streamed tool call)")
        job = subprocess.run(
            ["sh", "-c", f"echo $$ > {cg}/cgroup.procs && exec \"$@\"", "sh", sys.executable,
             f"{ROOT}/tests/fixtures/ai_client.py", "--ip", API_IP, "--port", "7443", "--host", NAME,
             "openai-chat", "", "--stream", "--step", "3",
             "--tool", 'run_terminal_cmd={"command": "rm -rf ~"}'],
            stdout=subprocess.PIPE, text=True)
        out = json.loads(job.stdout.strip().splitlines()[-1])
        got = [c for c in out.get("tool_calls", []) if "rm" in c.get("arguments", "")]
        print(f"the openai library raised: {out.get('error')}")
        print(f"the call reached the agent: {'YES (bug!)' if got else 'no'}")
        if got or not out.get("error"):
            sys.exit(1)

        step("What the node recorded")
        time.sleep(0.5)
        run([*cli, "sessions", "list"])
        sessions = json.loads(subprocess.run([*cli, "sessions", "list", "--json"], capture_output=True,
                                             text=True).stdout)
        sid = str(sessions[0]["id"])
        run([*cli, "sessions", "replay", sid])
        run([*cli, "verify", "--session", sid])
        if leaked:
            sys.exit(1)
        if console_url:
            step("The same session in the console")
            found = None
            for _ in range(150):
                try:
                    with urllib.request.urlopen(f"{console_url}/api/sessions?node=demo-node", timeout=5) as r:
                        rows = json.load(r)["sessions"]
                    found = next((x for x in rows if str(x["id"]) == sid and x["exchanges"] > 0), None)
                except OSError:
                    pass
                if found:
                    break
                time.sleep(0.2)
            if not found:
                sys.exit("the console never showed the session: " + open(f"{work}/console.log").read())
            print(f"open {console_url}/sessions/demo-node/{sid}  (the replay, masked spans marked)")
            print(f"     {console_url}/nodes  (the node's chain: verified)")
            if sys.stdin.isatty():
                input("press Enter to stop the demo (the console stays up until then) ")
    finally:
        step("Cleaning up")
        subprocess.run([*cli, "ca", "uninstall", "--config", cfg, "--state-dir", state], capture_output=True)
        for pr in reversed(procs):
            pr.terminate()
            try:
                pr.wait(5)
            except subprocess.TimeoutExpired:
                pr.kill()
        subprocess.run([sluice, "detach", "--config", cfg], capture_output=True)
        sh(f"ip netns del {NS}", check=False)
        sh(f"ip link del {HOST_IF}", check=False)
        for _ in range(50):
            try:
                os.rmdir(cg)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        shutil.rmtree(work, ignore_errors=True)
        print("done")


if __name__ == "__main__":
    main()
