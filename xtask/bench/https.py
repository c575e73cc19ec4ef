#!/usr/bin/env python3
"""HTTPS benchmark: keep-alive request rate / latency and bulk download
speed for an HTTPS API, side by side in one run, three ways:

  direct     client -> fake upstream
  sluice     client in a watched cgroup -> eBPF redirect -> Sluice
             (TLS intercepted with the node CA, exchanges recorded) -> upstream
  mitmproxy  client -> mitmdump on 127.0.0.1 (explicit proxy, CONNECT)
             -> upstream

Reports ratios against direct. The upstream (tests/fixtures/fake_upstream.rs)
lives in a network namespace this script creates (10.214.0.2); the load
client is tests/fixtures/https_bench.rs. Needs root. Everything it creates
(namespace, veth, cgroup, node CA in the system trust store, processes,
temporary directory) is removed at the end.

    python3 xtask/bench/https.py --sluice target/release/sluice \\
        --bench target/release/examples/https_bench \\
        --upstream target/release/examples/fake_upstream
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

NS = "sluice-hbench"
HOST_IF, PEER_IF = "shbench0", "shbench1"
HOST_IP, REMOTE_IP = "10.214.0.1", "10.214.0.2"
CGROUP = "sluice-hbench"
HOST = "api.fake.test"
SLUICE_PORT = 15998
MITM_PORT = 18914
VARIANTS = ["direct", "sluice", "mitmproxy"]


def sh(cmd, check=True):
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True)


def cgroup2_root():
    best = None
    for line in open("/proc/self/mountinfo"):
        pre, _, post = line.partition(" - ")
        if post.split()[0] == "cgroup2":
            mp = pre.split()[4]
            if best is None or len(mp) < len(best):
                best = mp
    return best


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


def stop(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


# ---------------------------------------------------------------- driver
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--bench", required=True, help="the https_bench example binary")
    ap.add_argument("--upstream", required=True, help="the fake_upstream example binary")
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--duration-secs", type=float, default=5.0)
    ap.add_argument("--body-bytes", type=int, default=1024)
    ap.add_argument("--download-mb", type=int, default=200)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--no-mitmproxy", action="store_true")
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
    tmp = tempfile.mkdtemp(prefix="sluice-hbench-")
    upstream = node = mitm = None
    ca_installed = False
    cfg = os.path.join(tmp, "hbench.yaml")
    state = os.path.join(tmp, "state")
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
                                     "--ca-out", upstream_ca, "--log", upstream_log],
                                    stdout=subprocess.DEVNULL)
        wait_until("fake upstream", lambda: os.path.exists(upstream_ca) and can_connect(REMOTE_IP, 443),
                   proc=upstream)

        os.makedirs(cg, exist_ok=True)
        with open(cfg, "w") as f:
            f.write("proxy:\n  port: %d\nwatch:\n  cgroups: [{path: %s}]\n"
                    "targets:\n  - name: hbench-api\n    addresses: [\"%s\"]\n    ports: [443]\n"
                    "    tls: intercept\n    sni: [%s]\n"
                    "workloads:\n  - name: hbench\n    cgroup: \"/%s\"\n"
                    "tls:\n  extra_upstream_roots: [\"%s\"]\n"
                    % (SLUICE_PORT, CGROUP, REMOTE_IP, HOST, CGROUP, upstream_ca))
        sock = os.path.join(tmp, "control.sock")
        node_log = os.path.join(tmp, "sluice.log")
        node = subprocess.Popen([sluice, "--socket", sock, "run", "--config", cfg, "--state-dir", state],
                                stdout=subprocess.DEVNULL, stderr=open(node_log, "w"),
                                env=dict(os.environ, SLUICE_LOG="warn", NO_COLOR="1"))
        wait_until("sluice", lambda: subprocess.run([sluice, "--socket", sock, "status"],
                                                    capture_output=True).returncode == 0,
                   proc=node, log=node_log)
        r = subprocess.run([sluice, "ca", "install", "--config", cfg, "--state-dir", state],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("sluice ca install: %s" % r.stderr.strip())
        ca_installed = True

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

        base = [bench, "--connect", "%s:443" % REMOTE_IP, "--host", HOST]

        def client(variant, extra):
            if variant == "direct":
                cmd = base + ["--cafile", upstream_ca] + extra
            elif variant == "sluice":
                # No --cafile: the node CA is trusted through the system store.
                cmd = ["sh", "-c", 'echo $$ > %s/cgroup.procs && exec "$@"' % cg, "sh"] + base + extra
            else:
                cmd = base + ["--proxy", "127.0.0.1:%d" % MITM_PORT, "--cafile", mitm_ca] + extra
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.duration_secs + 120)
            if r.returncode != 0:
                raise RuntimeError("%s client failed (exit %d): %s%s"
                                   % (variant, r.returncode, r.stdout, r.stderr))
            if r.stderr.strip():
                print("  [%s] %s" % (variant, r.stderr.strip()), flush=True)
            return json.loads(r.stdout)

        load_args = ["--path", "/bytes?n=%d" % a.body_bytes, "--conns", str(a.conns),
                     "--duration-secs", str(a.duration_secs)]
        dl_args = ["--download-mb", str(a.download_mb)]
        results = {v: {"load": [], "dl": []} for v in variants}
        # Interleave runs so that machine noise hits every path alike.
        for i in range(a.runs):
            for v in variants:
                res = client(v, load_args)
                results[v]["load"].append(res)
                print("run %d %-9s load     %s" % (i + 1, v, json.dumps(res)), flush=True)
            for v in variants:
                res = client(v, dl_args)
                results[v]["dl"].append(res)
                print("run %d %-9s download %s" % (i + 1, v, json.dumps(res)), flush=True)

        # Evidence that the sluice runs really went through interception.
        sessions = json.loads(subprocess.run(
            [sluice, "--socket", sock, "sessions", "list", "--json", "--limit", "100000"],
            capture_output=True, text=True, check=True).stdout)
        intercepted = sum(1 for s in sessions if "intercepted" in json.dumps(s.get("tls")))
        expected = a.runs * (a.conns + 1)
        st = json.loads(subprocess.run([sluice, "--socket", sock, "status", "--json"],
                                       capture_output=True, text=True, check=True).stdout)
        if intercepted < expected:
            raise RuntimeError("only %d of %d sluice-path connections were TLS-intercepted; status: %s"
                               % (intercepted, expected, st))

        # ---------------------------------------------------------- report
        def best(v, kind, key, lower_is_better):
            vals = [r[key] for r in results[v][kind]]
            return min(vals) if lower_is_better else max(vals)

        rows = [("requests/s", "load", "rps", False, "%.0f"),
                ("p50 latency (ms)", "load", "p50_ms", True, "%.3f"),
                ("p99 latency (ms)", "load", "p99_ms", True, "%.3f"),
                ("conn setup p50 (ms)", "load", "connect_ms", True, "%.2f"),
                ("download (MB/s)", "dl", "mb_s", False, "%.1f")]
        print()
        print("Sluice HTTPS benchmark: %d keep-alive conns x %gs of GET %d B bodies; %d MiB download; "
              "best of %d interleaved runs" % (a.conns, a.duration_secs, a.body_bytes, a.download_mb, a.runs))
        hdr = "%-21s %11s %11s %11s %9s %9s" % ("metric", "direct", "sluice", "mitmproxy",
                                                "sluice/d", "mitm/d")
        print(hdr)
        print("-" * len(hdr))
        for name, kind, key, lower, fmt in rows:
            d = best("direct", kind, key, lower)
            cells, ratios = [], []
            for v in ("sluice", "mitmproxy"):
                if v in results:
                    x = best(v, kind, key, lower)
                    cells.append(fmt % x)
                    ratios.append("%.2f" % (x / d) if d else "-")
                else:
                    cells.append("n/a")
                    ratios.append("n/a")
            print("%-21s %11s %11s %11s %9s %9s" % (name, fmt % d, cells[0], cells[1], ratios[0], ratios[1]))
        errs = {v: sum(r["errors"] for r in results[v]["load"]) for v in results}
        print("%-21s %11d %11s %11s" % ("request errors", errs["direct"], errs["sluice"],
                                         errs.get("mitmproxy", "n/a")))
        print("(ratio vs direct: requests/s and MB/s <1 = slower; latency >1 = slower)")
        print("sluice: %d TLS-intercepted connections recorded, records_stored=%d, kernel_redirected=%d"
              % (intercepted, st["records_stored"], st["kernel_redirected"]))
        if mitm_error is None:
            print("mitmproxy: %s (mitmdump, explicit proxy via CONNECT, stream_large_bodies=1m)" % mitm_version)
        else:
            print("mitmproxy: UNAVAILABLE: %s" % mitm_error)
    finally:
        stop(mitm)
        if ca_installed:
            r = subprocess.run([sluice, "ca", "uninstall", "--config", cfg, "--state-dir", state],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print("warning: sluice ca uninstall failed: %s" % r.stderr.strip(), file=sys.stderr)
        stop(node)
        if upstream is not None:
            upstream.kill()
            upstream.wait()
        sh("ip netns del %s" % NS, check=False)
        sh("ip link del %s" % HOST_IF, check=False)
        for _ in range(50):
            try:
                os.rmdir(cg)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
