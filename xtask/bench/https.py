#!/usr/bin/env python3
"""HTTPS benchmark: keep-alive request rate / latency and bulk download
speed for an HTTPS API, side by side in one run, three ways:

  direct     client -> fake upstream
  sluice     client in a watched cgroup -> eBPF redirect -> Sluice
             (TLS intercepted with the node CA, exchanges recorded) -> upstream
  enforced   as sluice, from a second watched cgroup whose workload a
             signed policy bundle covers: mask rules (secrets + pii packs)
             on responses, a block rule on requests (the cost of enforcement)
  mitmproxy  client -> mitmdump on 127.0.0.1 (explicit proxy, CONNECT)
             -> upstream
  nginx-proxy (nginx/wrk/h2load part) the peer: a second nginx on the host,
             2 workers, terminating the client's TLS and proxying over
             verified, kept-alive TLS to the upstream: the same hops as the
             node (two TLS sessions, four sockets per exchange) and none of
             its work (no redirect, identity, policy, records). What those
             hops cost on this machine before Sluice does anything.

Reports ratios against direct, for the load at each --conns level (default
1 and 8 keep-alive connections). The upstream (tests/fixtures/fake_upstream.rs)
lives in a network namespace this script creates (10.214.0.2); the load
client is tests/fixtures/https_bench.rs. Needs root. Everything it creates
(namespace, veth, cgroup, node CA in the system trust store, processes,
temporary directory) is removed at the end; SLUICE_BENCH_KEEP=1 keeps the
temporary directory (node log and records) for a look afterwards.

    python3 xtask/bench/https.py --sluice target/release/sluice \\
        --bench target/release/examples/https_bench \\
        --upstream target/release/examples/fake_upstream
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from common import cgroup2_root, sh

NS = "sluice-hbench"
HOST_IF, PEER_IF = "shbench0", "shbench1"
HOST_IP, REMOTE_IP = "10.214.0.1", "10.214.0.2"
CGROUP = "sluice-hbench"
HOST = "api.fake.test"
SLUICE_PORT = 15998
MITM_PORT = 18914
CGROUP_ENF = "sluice-hbench-enf"
VARIANTS = ["direct", "sluice", "enforced", "mitmproxy"]
NGINX_PORT = 4443
PEER_PORT = 4444
TRUST_LOCK = "/run/lock/sluice-e2e-trust.lock"  # tests/e2e/harness.rs: trust_store_lock

BUNDLE = """version: 1
name: hbench-enforcement
workloads:
  - name: enforced
    cgroup: "/%s"
rules:
  - id: mask-secrets
    on: response
    workloads: [enforced]
    packs: [secrets, pii]
    action: mask
  - id: block-prod-creds
    on: request
    workloads: [enforced]
    patterns: [{id: prod, regex: '(?i)production (?:password|credential)s?'}]
    action: block
""" % CGROUP_ENF


def wait_until(what, ok, timeout=30.0, proc=None, log=None):
    deadline = time.time() + timeout
    while not ok():
        if proc is not None and proc.poll() is not None:
            tail = open(log).read()[-3000:] if log and os.path.exists(log) else ""
            raise RuntimeError("%s exited (%s) before it was ready\n%s" % (what, proc.returncode, tail))
        if time.time() > deadline:
            raise RuntimeError("timed out waiting for %s" % what)
        time.sleep(0.1)


def can_connect(ip, port):
    try:
        socket.create_connection((ip, port), timeout=1).close()
        return True
    except OSError:
        return False


def stop(proc, grace=10):
    """SIGTERM, then SIGKILL after `grace` seconds; says which it took."""
    if proc is None or proc.poll() is not None:
        return "already exited"
    proc.terminate()
    try:
        proc.wait(timeout=grace)
        return "exited on SIGTERM"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "needed SIGKILL (no exit %gs after SIGTERM)" % grace


def ca_tool_runner(sluice, cfg, state):
    def run(action):
        # The e2e suite changes the system trust store too: both take its
        # lock, so neither runs update-ca-certificates under the other's
        # feet. Anything else doing so concurrently can still make ours
        # fail; it is idempotent, so retry.
        for attempt in range(5):
            r = subprocess.run(["flock", TRUST_LOCK, sluice, "ca", action, "--config", cfg,
                                "--state-dir", state], capture_output=True, text=True)
            if r.returncode == 0:
                return
            time.sleep(1 + attempt)
        raise RuntimeError("sluice ca %s: %s" % (action, r.stderr.strip()))
    return run


# ---------------------------------------------------------------- mitmproxy
def ensure_mitmproxy():
    """Returns None when mitmproxy is importable (installing it with pip if
    needed), else the reason it is not."""
    probe = [sys.executable, "-c", "import mitmproxy.tools.main"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return None
    print("mitmproxy not importable; python3 -m pip install --quiet mitmproxy ...", flush=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "mitmproxy"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return "pip install mitmproxy failed (exit %d): %s" % (r.returncode, (r.stderr or r.stdout).strip()[-2000:])
    r = subprocess.run(probe, capture_output=True, text=True)
    if r.returncode != 0:
        return "mitmproxy installed but not importable: %s" % r.stderr.strip()[-2000:]
    return None


def start_mitmdump(tmp, upstream_ca):
    conf = os.path.join(tmp, "mitmproxy")
    os.makedirs(conf, exist_ok=True)
    log = os.path.join(tmp, "mitmdump.log")
    cmd = [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()",
           "--listen-host", "127.0.0.1", "--listen-port", str(MITM_PORT),
           "--set", "confdir=%s" % conf,
           "--set", "ssl_verify_upstream_trusted_ca=%s" % upstream_ca,
           # Stream bodies over 1 MiB instead of buffering them whole (its
           # default): the setting one would use for large downloads.
           "--set", "stream_large_bodies=1m",
           "--set", "termlog_verbosity=warn", "--set", "flow_detail=0"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    ca = os.path.join(conf, "mitmproxy-ca-cert.pem")
    try:
        wait_until("mitmdump", lambda: os.path.exists(ca) and can_connect("127.0.0.1", MITM_PORT),
                   proc=proc, log=log)
    except Exception:
        stop(proc)
        raise
    version = subprocess.run([sys.executable, "-c", "import mitmproxy.version as v; print(v.VERSION)"],
                             capture_output=True, text=True).stdout.strip()
    return proc, ca, version


# ---------------------------------------------------------------- nginx, wrk, h2load
def nginx_conf(tmp, name, workers, body):
    """An nginx configuration whose files all live in `tmp` under `name`,
    with `body` inside its http block."""
    return """worker_processes %(workers)d;
pid %(tmp)s/%(name)s.pid;
error_log %(tmp)s/%(name)s-error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path %(tmp)s/%(name)s-body;
    proxy_temp_path %(tmp)s/%(name)s-proxy;
    fastcgi_temp_path %(tmp)s/%(name)s-fastcgi;
    uwsgi_temp_path %(tmp)s/%(name)s-uwsgi;
    scgi_temp_path %(tmp)s/%(name)s-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
%(body)s
}
""" % {"tmp": tmp, "name": name, "workers": workers, "body": body}


def run_nginx(tmp, name, conf_text, ip, port, netns=None):
    """Starts nginx with `conf_text` (in `netns` if given) and waits until
    it answers on ip:port; fails loudly if it exits (something else on the
    port: never measure the wrong server)."""
    conf = os.path.join(tmp, "%s.conf" % name)
    with open(conf, "w") as f:
        f.write(conf_text)
    cmd = ["nginx", "-c", conf, "-g", "daemon off;"]
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    log = os.path.join(tmp, "%s.log" % name)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    wait_until(name, lambda: can_connect(ip, port), proc=proc, log=log)
    time.sleep(0.3)
    if proc.poll() is not None:
        raise RuntimeError("%s exited (%s): %s" % (name, proc.returncode,
                                                   open(os.path.join(tmp, "%s-error.log" % name)).read()[-2000:]))
    return proc


def start_nginx(tmp, body_bytes):
    """The upstream: 1 worker, TLS 1.3, h2, a fixed body at /bytes."""
    body = """    server {
        listen %(ip)s:%(port)d ssl http2;
        ssl_certificate %(tmp)s/api.crt;
        ssl_certificate_key %(tmp)s/api.key;
        ssl_protocols TLSv1.3;
        location = /bytes { default_type application/octet-stream; return 200 "%(body)s"; }
    }""" % {"tmp": tmp, "ip": REMOTE_IP, "port": NGINX_PORT, "body": "n" * body_bytes}
    return run_nginx(tmp, "nginx", nginx_conf(tmp, "nginx", 1, body), REMOTE_IP, NGINX_PORT, netns=NS)


def start_peer(tmp, upstream_ca):
    """The peer: a TLS-terminating reverse proxy to the upstream, 2 workers."""
    body = """    upstream api { server %(ip)s:%(port)d; keepalive 256; keepalive_requests 100000000; }
    server {
        listen 127.0.0.1:%(peer)d ssl http2;
        ssl_certificate %(tmp)s/api.crt;
        ssl_certificate_key %(tmp)s/api.key;
        ssl_protocols TLSv1.3;
        location / {
            proxy_pass https://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_server_name on;
            proxy_ssl_name %(host)s;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate %(ca)s;
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.3;
        }
    }""" % {"tmp": tmp, "ip": REMOTE_IP, "port": NGINX_PORT, "peer": PEER_PORT, "host": HOST,
            "ca": upstream_ca}
    return run_nginx(tmp, "peer", nginx_conf(tmp, "peer", 2, body), "127.0.0.1", PEER_PORT)


def memory(pid):
    """Resident memory of a process: total, anonymous (heap, stacks) and
    file-backed (the binary and libraries), from /proc/PID/status."""
    fields = {}
    for line in open("/proc/%d/status" % pid):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            fields[k] = int(v.split()[0]) / 1024
    return "%.1f MiB resident (%.1f MiB anonymous, %.1f MiB file-backed)" % (
        fields.get("VmRSS", 0), fields.get("RssAnon", 0), fields.get("RssFile", 0))


def held_memory(n, cg, node, sluice, sock):
    """The node's memory while a job holds `n` intercepted keep-alive
    connections (one GET answered on each), and after they close."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures",
                          "https_client.py")
    active = lambda: json.loads(subprocess.run([sluice, "--socket", sock, "status", "--json"],
                                               capture_output=True, text=True).stdout)["connections_active"]
    before = memory(node.pid)
    holder = subprocess.Popen(["sh", "-c", 'echo $$ > %s/cgroup.procs && exec "$@"' % cg, "sh", "python3",
                               script, "hold", REMOTE_IP, HOST, "443", str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held = json.loads(holder.stdout.readline())
        if held.get("ok") != n:
            raise RuntimeError("holding %d connections: %s" % (n, held))
        during = memory(node.pid)
        # Past limits.upstream_idle_secs (default 15): the idle upstream
        # connections are let go, the job's stay open.
        time.sleep(20)
        idle = memory(node.pid)
        holder.stdin.write("close\n")
        holder.stdin.flush()
        holder.stdout.readline()
    finally:
        holder.kill()
        holder.wait()
    wait_until("the node to let the connections go", lambda: active() == 0)
    time.sleep(7)  # the trimmer's period and then some
    print("\nnode memory, %d intercepted keep-alive connections held by a job:" % n)
    print("  before:             %s\n  held:               %s\n  held, idle for 20s: %s\n"
          "  after close:        %s" % (before, during, idle, memory(node.pid)))


def in_place(tmp, cgroup, cmd, ip=REMOTE_IP):
    """`cmd` with HOST resolving to `ip` (a private /etc/hosts in a mount
    namespace of its own: wrk and h2load take the TLS name from the URL and
    have no --resolve) and, for the Sluice variants, in `cgroup`."""
    hosts = os.path.join(tmp, "hosts-%s" % ip)
    with open(hosts, "w") as f:
        f.write("127.0.0.1 localhost\n%s %s\n" % (ip, HOST))
    enter = "echo $$ > %s/cgroup.procs && " % cgroup if cgroup else ""
    return ["unshare", "-m", "sh", "-c", 'mount --bind %s /etc/hosts && %sexec "$@"' % (hosts, enter),
            "sh"] + cmd


def parse_wrk(out):
    """req/s, p50 and p99 in ms, errors from `wrk --latency` output."""
    import re
    res = {"errors": 0}
    unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"Requests/sec:\s+([\d.]+)", line)
        if m:
            res["rps"] = float(m.group(1))
        m = re.match(r"(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)$", line)
        if m:
            res["p%s_ms" % m.group(1)] = float(m.group(2)) * unit[m.group(3)]
        m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", line)
        if m:
            res["errors"] += sum(int(x) for x in m.groups())
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", line)
        if m:
            res["errors"] += int(m.group(1))
    if "rps" not in res:
        res["failed"] = "no Requests/sec in wrk output: %s" % out[-500:]
    return res


def parse_h2load(out):
    import re
    res = {"errors": 0}
    for line in out.splitlines():
        m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", line)
        if m:
            res["rps"] = float(m.group(1))
        m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", line)
        if m:
            res["errors"] += int(m.group(2)) + int(m.group(3))
            res["succeeded"] = int(m.group(1))
        m = re.search(r"status codes: \d+ 2xx, \d+ 3xx, (\d+) 4xx, (\d+) 5xx", line)
        if m:
            res["errors"] += int(m.group(1)) + int(m.group(2))
        m = re.match(r"\s*time for request:\s+[\d.]+\w+\s+[\d.]+\w+\s+([\d.]+)(us|ms|s)", line)
        if m:
            res["mean_ms"] = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    if "rps" not in res or not res.get("succeeded"):
        res["failed"] = "h2load did not finish cleanly: %s" % out[-500:]
    return res


def tree_cpu(pid):
    """User + system CPU seconds of a process, its threads and its
    children (nginx's workers), so far."""
    tck = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tck
            for t in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, t)) as f:
                    todo += [int(x) for x in f.read().split()]
        except (OSError, ValueError, IndexError):
            pass
    return total


def tools_bench(a, tmp, cg, cg_enf, sluice, sock, upstream_ca, node_pid):
    for tool in ("nginx", "wrk", "h2load", "unshare"):
        if shutil.which(tool) is None:
            raise RuntimeError("%s is not installed (scripts/setup.sh bench installs it)" % tool)
    nginx = start_nginx(tmp, a.body_bytes)
    peer = None
    variants = a.tool_variants.split(",")
    where = {"direct": None, "sluice": cg, "enforced": cg_enf, "nginx-proxy": None}
    dur = "%ds" % max(1, int(a.duration_secs))

    def loads_for(port):
        url = "https://%s:%d/bytes" % (HOST, port)
        out = [("wrk %d conn" % c, ["wrk", "--latency", "-t", str(min(c, 2)), "-c", str(c), "-d", dur, url],
                parse_wrk) for c in (int(x) for x in a.tool_conns.split(","))]
        out.append(("h2load 8x10", ["h2load", "-c", "8", "-m", "10", "-t", "2", "-D", dur, url], parse_h2load))
        return out
    loads = loads_for(NGINX_PORT)
    peer_loads = {name: cmd for name, cmd, _ in loads_for(PEER_PORT)}
    results = {v: {name: [] for name, _, _ in loads} for v in variants}
    try:
        peer = start_peer(tmp, upstream_ca)
        for i in range(a.runs):
            for name, cmd, parse in loads:
                for v in variants:
                    try:
                        if v == "nginx-proxy":
                            place = in_place(tmp, None, peer_loads[name], ip="127.0.0.1")
                        else:
                            place = in_place(tmp, where[v], cmd)
                        # The proxy's own CPU (the node's process, or the
                        # peer's master and workers) over the run.
                        proxy_pid = {"sluice": node_pid, "enforced": node_pid,
                                     "nginx-proxy": peer.pid}.get(v)
                        cpu0 = tree_cpu(proxy_pid) if proxy_pid else 0.0
                        perf = None
                        if a.perf_dir and i == 0 and v in ("sluice", "enforced"):
                            # A profile of the node under this load
                            # (perf report -i <file>); its sampling
                            # costs the run a few per cent.
                            os.makedirs(a.perf_dir, exist_ok=True)
                            out = os.path.join(a.perf_dir, "%s-%s.data" % (v, name.replace(" ", "_")))
                            how = os.environ.get("SLUICE_BENCH_PERF", "record -q -g -F 999").split()
                            perf = subprocess.Popen(["perf"] + how + ["-p", str(node_pid), "-o", out],
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        r = subprocess.run(place, capture_output=True, text=True,
                                           timeout=a.duration_secs + 30)
                        if perf is not None:
                            perf.send_signal(signal.SIGINT)
                            perf.wait()
                        cpu = tree_cpu(proxy_pid) - cpu0 if proxy_pid else None
                        res = parse(r.stdout) if r.returncode == 0 else {"failed": (r.stderr or r.stdout)[-500:]}
                        if cpu is not None and res.get("rps"):
                            res["cpu_us"] = cpu / (res["rps"] * int(dur[:-1])) * 1e6
                        if res.get("errors"):
                            res["output"] = r.stdout[-600:]
                    except subprocess.TimeoutExpired:
                        res = {"failed": "no result %ds after its end" % 30}
                    print("run %d %-9s %-12s %s" % (i + 1, v, name, json.dumps(res)), flush=True)
                    results[v][name].append(res)
    finally:
        for proc in (nginx, peer):
            if proc is not None:
                proc.terminate()
                proc.wait()

    def best(v, name, key, lower):
        vals = [r[key] for r in results.get(v, {}).get(name, [])
                if "failed" not in r and not r.get("errors") and key in r]
        if not vals:
            return None
        return min(vals) if lower else max(vals)

    print()
    print("nginx %s upstream (TLS 1.3, 1 worker), %d B bodies, %s per run, best of %d interleaved runs"
          % (subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1],
             a.body_bytes, dur, a.runs))
    # The peer ratio leads: what a user compares Sluice with is the proxy
    # they would otherwise run; direct is the floor no proxy reaches.
    hdr = "%-26s %11s %11s %11s %11s %9s %9s %9s %9s" % (
        "metric", "direct", "sluice", "enforced", "nginx-prx", "sluice/ng", "enf/ng", "sluice/d", "nginx/d")
    print(hdr)
    print("-" * len(hdr))
    failed = []
    for name, _, _ in loads:
        metrics = [("req/s", "rps", False, "%.0f"), ("p50 ms", "p50_ms", True, "%.3f"),
                   ("p99 ms", "p99_ms", True, "%.3f")] if name.startswith("wrk") else \
                  [("req/s", "rps", False, "%.0f"), ("mean ms", "mean_ms", True, "%.3f")]
        metrics.append(("CPU us/req", "cpu_us", True, "%.1f"))
        for label, key, lower, fmt in metrics:
            d = best("direct", name, key, lower)
            cells = [fmt % d if d is not None else "-"]
            vals = {}
            for v in ("sluice", "enforced", "nginx-proxy"):
                vals[v] = best(v, name, key, lower)
                cells.append(fmt % vals[v] if vals[v] is not None else "FAILED")
            ng = vals["nginx-proxy"]
            ratio = lambda x, y: "%.2f" % (x / y) if x is not None and y else "-"
            cells += [ratio(vals["sluice"], ng), ratio(vals["enforced"], ng),
                      ratio(vals["sluice"], d), ratio(ng, d)]
            print("%-26s %11s %11s %11s %11s %9s %9s %9s %9s" % tuple(["%s, %s" % (name, label)] + cells))
        for v in variants:
            if best(v, name, "rps", False) is None:
                failed.append("%s %s" % (v, name))
    added = [(c, best("sluice", "wrk %d conn" % c, "p50_ms", True), best("direct", "wrk %d conn" % c, "p50_ms", True))
             for c in (int(x) for x in a.tool_conns.split(","))]
    for c, s, d in added:
        if s is not None and d is not None:
            p = best("nginx-proxy", "wrk %d conn" % c, "p50_ms", True)
            e = best("enforced", "wrk %d conn" % c, "p50_ms", True)
            print("added p50 at %d conn: sluice %.0f us, enforced %s (nginx proxy: %s)"
                  % (c, (s - d) * 1000, "%.0f us" % ((e - d) * 1000) if e is not None else "-",
                     "%.0f us" % ((p - d) * 1000) if p is not None else "-"))
    if failed:
        raise RuntimeError("variants with no clean run: %s" % ", ".join(failed))


# ---------------------------------------------------------------- driver
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--bench", required=True, help="the https_bench example binary")
    ap.add_argument("--upstream", required=True, help="the fake_upstream example binary")
    ap.add_argument("--conns", default="1,8", help="keep-alive connection counts, comma-separated")
    ap.add_argument("--duration-secs", type=float, default=5.0)
    ap.add_argument("--body-bytes", type=int, default=1024)
    ap.add_argument("--download-mb", type=int, default=200)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--timeout-secs", type=float, default=5.0,
                    help="client: a step with no progress for this long is an error")
    ap.add_argument("--no-mitmproxy", action="store_true")
    ap.add_argument("--tool-conns", default="1,8,64",
                    help="wrk connection counts against nginx, comma-separated")
    ap.add_argument("--no-tools", action="store_true", help="skip the nginx/wrk/h2load part")
    ap.add_argument("--tool-variants", default="direct,sluice,enforced,nginx-proxy",
                    help="variants in the nginx/wrk/h2load part (e.g. only sluice, to profile it)")
    ap.add_argument("--no-client", action="store_true", help="skip the Rust client part")
    ap.add_argument("--perf-dir", help="record a perf profile of the node for each load of the first run here")
    ap.add_argument("--hold", type=int, default=1000,
                    help="measure the node's memory holding this many intercepted connections (0: skip)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (eBPF, cgroups, network namespaces, system trust store)")
    for p in (a.sluice, a.bench, a.upstream):
        if not os.access(p, os.X_OK):
            sys.exit("bench: %s is not built (cargo build --release --examples -p node-agent)" % p)
    sluice, bench, upstream_bin = (os.path.abspath(p) for p in (a.sluice, a.bench, a.upstream))

    sh("ip netns del %s" % NS, check=False)
    sh("ip link del %s" % HOST_IF, check=False)
    cg = os.path.join(cgroup2_root(), CGROUP)
    cg_enf = os.path.join(cgroup2_root(), CGROUP_ENF)
    tmp = tempfile.mkdtemp(prefix="sluice-hbench-")
    upstream = node = mitm = None
    ca_installed = False
    cfg = os.path.join(tmp, "hbench.yaml")
    state = os.path.join(tmp, "state")
    ca_tool = ca_tool_runner(sluice, cfg, state)
    try:
        sh("ip netns add %s" % NS)
        sh("ip link add %s type veth peer name %s" % (HOST_IF, PEER_IF))
        sh("ip link set %s netns %s" % (PEER_IF, NS))
        sh("ip addr add %s/24 dev %s && ip link set %s up" % (HOST_IP, HOST_IF, HOST_IF))
        sh("ip netns exec %s sh -c 'ip link set lo up && ip addr add %s/24 dev %s && ip link set %s up'"
           % (NS, REMOTE_IP, PEER_IF, PEER_IF))
        upstream_ca = os.path.join(tmp, "upstream-ca.pem")
        upstream_log = os.path.join(tmp, "upstream.log")
        upstream = subprocess.Popen(["ip", "netns", "exec", NS, upstream_bin, "--bind", REMOTE_IP,
                                     "--ca-out", upstream_ca, "--log", upstream_log,
                                     "--leaf-out", tmp],
                                    stdout=subprocess.DEVNULL)
        wait_until("fake upstream", lambda: os.path.exists(upstream_ca) and can_connect(REMOTE_IP, 443),
                   proc=upstream)

        os.makedirs(cg, exist_ok=True)
        os.makedirs(cg_enf, exist_ok=True)
        keys = os.path.join(tmp, "team")
        subprocess.run([sluice, "policy", "keygen", keys], check=True, capture_output=True)
        with open(cfg, "w") as f:
            f.write("proxy:\n  port: %d\n  limits: {max_connections_per_identity: %d, idle_timeout_secs: 600}\nwatch:\n  host: {enabled: false}\n  cgroups: [{path: %s}, {path: %s}]\n"
                    "targets:\n  - name: hbench-api\n    addresses: [\"%s\"]\n    ports: [443, %d]\n"
                    "    tls: intercept\n    sni: [%s]\n"
                    "workloads:\n  - name: hbench\n    cgroup: \"/%s*\"\n"
                    "tls:\n  extra_upstream_roots: [\"%s\"]\n"
                    "policy:\n  trusted_keys: [\"%s.pub\"]\n"
                    % (SLUICE_PORT, a.hold + 64, CGROUP, CGROUP_ENF, REMOTE_IP, NGINX_PORT, HOST, CGROUP, upstream_ca, keys))
        sock = os.path.join(tmp, "control.sock")
        node_log = os.path.join(tmp, "sluice.log")

        def start_node():
            n = subprocess.Popen([sluice, "--socket", sock, "run", "--config", cfg, "--state-dir", state],
                                 stdout=subprocess.DEVNULL, stderr=open(node_log, "a"),
                                 env=dict(os.environ, SLUICE_LOG="warn", NO_COLOR="1"))
            try:
                wait_until("sluice", lambda: subprocess.run([sluice, "--socket", sock, "status"],
                                                            capture_output=True).returncode == 0,
                           proc=n, log=node_log)
            except Exception:
                stop(n, grace=5)
                raise
            return n

        node = start_node()
        restarts = []
        bundle = os.path.join(tmp, "bundle.yaml")
        with open(bundle, "w") as f:
            f.write(BUNDLE)
        subprocess.run([sluice, "policy", "sign", bundle, "--key", keys + ".key"], check=True,
                       capture_output=True)
        subprocess.run([sluice, "--socket", sock, "policy", "push", bundle[:-5] + ".jws"], check=True,
                       capture_output=True)
        # Set first: a failed install may still have left the certificate.
        ca_installed = True
        ca_tool("install")
        # Idle memory, with the bundle compiled (the trimmer hands back the
        # compile's peak every 5 s; blocking-pool threads, with their stacks
        # and arenas, go after 10 s idle).
        time.sleep(15)
        print("node idle memory (release, this bundle): %s" % memory(node.pid), flush=True)

        mitm_error, mitm_ca, mitm_version = None, None, None
        if a.no_mitmproxy:
            mitm_error = "skipped (--no-mitmproxy)"
        else:
            mitm_error = ensure_mitmproxy()
            if mitm_error is None:
                try:
                    mitm, mitm_ca, mitm_version = start_mitmdump(tmp, upstream_ca)
                except Exception as e:  # reported, the other two still run
                    mitm_error = "mitmdump did not start: %s" % e
        variants = [v for v in VARIANTS if v != "mitmproxy" or mitm_error is None]

        base = [bench, "--connect", "%s:443" % REMOTE_IP, "--host", HOST,
                "--timeout-secs", str(a.timeout_secs)]

        def client(variant, extra):
            if variant == "direct":
                cmd = base + ["--cafile", upstream_ca] + extra
            elif variant in ("sluice", "enforced"):
                # No --cafile: the node CA is trusted through the system store.
                where = cg if variant == "sluice" else cg_enf
                cmd = ["sh", "-c", 'echo $$ > %s/cgroup.procs && exec "$@"' % where, "sh"] + base + extra
            else:
                cmd = base + ["--proxy", "127.0.0.1:%d" % MITM_PORT, "--cafile", mitm_ca] + extra
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.duration_secs + 300)
            if r.stderr.strip():
                print("  [%s] %s" % (variant, r.stderr.strip()), flush=True)
            if r.returncode != 0:
                return {"failed": r.stderr.strip() or "exit %d" % r.returncode}
            return json.loads(r.stdout)

        def measure(variant, what, extra):
            nonlocal node
            res = client(variant, extra)
            print("run %d %-9s %-8s %s" % (i + 1, variant, what, json.dumps(res)), flush=True)
            if variant in ("sluice", "enforced") and ("failed" in res or res.get("errors")):
                # Do not let one stuck node poison the measurements after it.
                how = stop(node, grace=5)
                restarts.append("run %d %s (node %s)" % (i + 1, what, how))
                print("  [sluice] requests failed: node %s; restarting it" % how, flush=True)
                node = start_node()
            return res

        if not a.no_client:
            conns_levels = [int(c) for c in a.conns.split(",")]
            kinds = ["load%d" % c for c in conns_levels] + ["dl"]
            results = {v: {k: [] for k in kinds} for v in variants}
            # Interleave runs so that machine noise hits every path alike.
            for i in range(a.runs):
                for c in conns_levels:
                    load_args = ["--path", "/bytes?n=%d" % a.body_bytes, "--conns", str(c),
                                 "--duration-secs", str(a.duration_secs)]
                    for v in variants:
                        results[v]["load%d" % c].append(measure(v, "load%d" % c, load_args))
                for v in variants:
                    results[v]["dl"].append(measure(v, "download", ["--download-mb", str(a.download_mb)]))

            # Evidence that the sluice runs really went through interception.
            sessions = json.loads(subprocess.run(
                [sluice, "--socket", sock, "sessions", "list", "--json", "--limit", "100000"],
                capture_output=True, text=True, check=True).stdout)
            intercepted = sum(1 for s in sessions if (s.get("tls") or {}).get("mode") == "intercepted")
            st = json.loads(subprocess.run([sluice, "--socket", sock, "status", "--json"],
                                           capture_output=True, text=True, check=True).stdout)
            if intercepted == 0:
                raise RuntimeError("no connection was TLS-intercepted by sluice; status: %s" % st)

            # ---------------------------------------------------------- report
            def best(v, kind, key, lower_is_better):
                """Best over the runs that completed without errors; None if none did."""
                vals = [r[key] for r in results[v][kind]
                        if "failed" not in r and not r.get("errors") and r.get(key) is not None]
                if not vals:
                    return None
                return min(vals) if lower_is_better else max(vals)

            rows = []
            for c in conns_levels:
                k = "load%d" % c
                rows += [("req/s, %d conn" % c, k, "rps", False, "%.0f"),
                         ("p50 ms, %d conn" % c, k, "p50_ms", True, "%.3f"),
                         ("p99 ms, %d conn" % c, k, "p99_ms", True, "%.3f")]
            rows += [("conn setup ms", "load%d" % conns_levels[0], "connect_ms", True, "%.2f"),
                     ("download MB/s", "dl", "mb_s", False, "%.1f")]
            print()
            print("Sluice HTTPS benchmark: keep-alive GET of %d B bodies for %gs at %s conn(s); "
                  "%d MiB download; best of %d interleaved runs"
                  % (a.body_bytes, a.duration_secs, "/".join(map(str, conns_levels)), a.download_mb, a.runs))
            hdr = "%-21s %11s %11s %11s %11s %9s %9s %9s" % ("metric", "direct", "sluice", "enforced",
                                                              "mitmproxy", "sluice/d", "enf/d", "mitm/d")
            print(hdr)
            print("-" * len(hdr))
            for name, kind, key, lower, fmt in rows:
                d = best("direct", kind, key, lower)
                cells, ratios = [fmt % d if d is not None else "FAILED"], []
                for v in ("sluice", "enforced", "mitmproxy"):
                    x = best(v, kind, key, lower) if v in results else None
                    cells.append("n/a" if v not in results else fmt % x if x is not None else "FAILED")
                    ratios.append("%.2f" % (x / d) if x is not None and d else "-")
                print("%-21s %11s %11s %11s %11s %9s %9s %9s" % tuple([name] + cells + ratios))

            def errors(v):
                if v not in results:
                    return "n/a"
                n = 0
                for k in kinds:
                    for r in results[v][k]:
                        n += 1 if "failed" in r else r.get("errors", 0)
                return str(n)
            print("%-21s %11s %11s %11s %11s" % ("errors (all runs)", errors("direct"), errors("sluice"),
                                                 errors("enforced"), errors("mitmproxy")))
            print("(ratio vs direct: req/s and MB/s <1 = slower; latency >1 = slower; "
                  "FAILED = no run without errors)")
            interrupted = sum(1 for s in sessions if (s.get("outcome") or {}).get("status") == "interrupted")
            print("sluice: %d sessions recorded: %d closed with tls.mode=intercepted, %d interrupted by a node "
                  "restart; since the last start: kernel_redirected=%d, connections_forwarded=%d"
                  % (len(sessions), intercepted, interrupted, st["kernel_redirected"], st["connections_forwarded"]))
            if restarts:
                print("sluice: node restarted after failed requests in: %s" % ", ".join(restarts))
            if mitm_error is None:
                print("mitmproxy: %s (mitmdump, explicit proxy via CONNECT, stream_large_bodies=1m)" % mitm_version)
            else:
                print("mitmproxy: UNAVAILABLE: %s" % mitm_error)
        if not a.no_tools:
            tools_bench(a, tmp, cg, cg_enf, sluice, sock, upstream_ca, node.pid)
        if a.hold:
            held_memory(a.hold, cg, node, sluice, sock)
    finally:
        stop(mitm)
        if ca_installed:
            try:
                ca_tool("uninstall")
            except RuntimeError as e:
                print("warning: %s" % e, file=sys.stderr)
        stop(node, grace=5)
        # The node leaves its hooks pinned (fail closed); remove them.
        subprocess.run([sluice, "detach", "--config", cfg], capture_output=True)
        if upstream is not None:
            upstream.kill()
            upstream.wait()
        sh("ip netns del %s" % NS, check=False)
        sh("ip link del %s" % HOST_IF, check=False)
        for d in (cg, cg_enf):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        if os.environ.get("SLUICE_BENCH_KEEP"):
            print("kept %s (logs, node state)" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
