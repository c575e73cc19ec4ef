#!/usr/bin/env python3
"""Passthrough benchmark: connect latency and bulk throughput through
Sluice's redirect + splice path against a direct connection to the same
server, side by side in one run. Reports ratios (via / direct).

Everything runs on this host: the server lives in a network namespace this
script creates (10.213.0.2), the client runs either outside (direct) or
inside (via Sluice) a cgroup the node watches. Needs root.

--all-egress: the cost of the recommended mode for SaaS targets. The node
redirects every :443 connection (`addresses: [0.0.0.0/0, ::/0]`,
`ports: [443]`, `tls: intercept`, `unknown_sni: splice`) and the client
speaks TLS to a server on :443 under a name that is *not* a target, so
every connection pays redirect + ClientHello read + splice. Both sides
(direct and via Sluice) do the same TLS handshake.

--host-cost: what `watch.host` (the redirect on the root cgroup) costs a
process of the host that is *not* in a job: the same client, outside every
watched cgroup, with no node at all against a node with `watch.host` on.
Without --all-egress the client's server is not a target (every connect
only runs the hook's lookups); with it, every :443 connection of the host
is redirected and spliced.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import cgroup2_root, sh

NS = "sluice-bench"
HOST_IF, PEER_IF = "sbench0", "sbench1"
HOST_IP, REMOTE_IP = "10.213.0.1", "10.213.0.2"
PING_PORT, BULK_PORT = 9000, 9001
TLS_PORT = 443
SPLICED_NAME = "not-a-target.bench.test"


# ---------------------------------------------------------------- server
def serve_tls(cert, key):
    """One TLS port: first byte 'p' = ping echo, 'b' + 8 bytes = bulk."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def conn(raw):
        try:
            c = ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        with c:
            kind = c.recv(1)
            if kind == b"p":
                c.sendall(b"p")
                while True:
                    b = c.recv(1)
                    if not b:
                        return
                    c.sendall(b)
            elif kind == b"b":
                n = int.from_bytes(c.recv(8), "big")
                chunk = b"x" * (1 << 20)
                while n > 0:
                    k = min(n, len(chunk))
                    c.sendall(chunk[:k])
                    n -= k

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((REMOTE_IP, TLS_PORT))
    s.listen(1024)
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=conn, args=(c,), daemon=True).start()


def tls_client(n_connects, bulk_bytes, bulk_rounds):
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def dial():
        raw = socket.create_connection((REMOTE_IP, TLS_PORT))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return ctx.wrap_socket(raw, server_hostname=SPLICED_NAME)

    lat = []
    for _ in range(n_connects):
        t0 = time.perf_counter()
        s = dial()
        s.sendall(b"p")
        s.recv(1)
        lat.append(time.perf_counter() - t0)
        s.close()
    rates = []
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    for _ in range(bulk_rounds):
        s = dial()
        t0 = time.perf_counter()
        s.sendall(b"b" + bulk_bytes.to_bytes(8, "big"))
        got = 0
        while got < bulk_bytes:
            k = s.recv_into(view)
            if not k:
                break
            got += k
        dt = time.perf_counter() - t0
        s.close()
        if got != bulk_bytes:
            sys.exit("short read: %d of %d" % (got, bulk_bytes))
        rates.append(got / dt / 1e6)
    lat.sort()
    print(json.dumps({
        "connect_p50_us": lat[len(lat) // 2] * 1e6,
        "connect_p99_us": lat[int(len(lat) * 0.99) - 1] * 1e6,
        "connect_mean_us": statistics.mean(lat) * 1e6,
        "bulk_mb_s": statistics.median(rates),
    }))


def serve():
    def ping_conn(c):
        with c:
            while True:
                b = c.recv(1)
                if not b:
                    return
                c.sendall(b)

    def bulk_conn(c):
        with c:
            n = int.from_bytes(c.recv(8), "big")
            chunk = b"x" * (1 << 20)
            while n > 0:
                k = min(n, len(chunk))
                c.sendall(chunk[:k])
                n -= k

    def listen(port, handler):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((REMOTE_IP, port))
        s.listen(1024)
        while True:
            c, _ = s.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handler, args=(c,), daemon=True).start()

    threading.Thread(target=listen, args=(PING_PORT, ping_conn), daemon=True).start()
    listen(BULK_PORT, bulk_conn)


# ---------------------------------------------------------------- client
def client(n_connects, bulk_bytes, bulk_rounds):
    lat = []
    for _ in range(n_connects):
        t0 = time.perf_counter()
        s = socket.create_connection((REMOTE_IP, PING_PORT))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"p")
        s.recv(1)
        lat.append(time.perf_counter() - t0)
        s.close()
    rates = []
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    for _ in range(bulk_rounds):
        s = socket.create_connection((REMOTE_IP, BULK_PORT))
        t0 = time.perf_counter()
        s.sendall(bulk_bytes.to_bytes(8, "big"))
        got = 0
        while got < bulk_bytes:
            k = s.recv_into(view)
            if not k:
                break
            got += k
        dt = time.perf_counter() - t0
        s.close()
        if got != bulk_bytes:
            sys.exit("short read: %d of %d" % (got, bulk_bytes))
        rates.append(got / dt / 1e6)
    lat.sort()
    print(json.dumps({
        "connect_p50_us": lat[len(lat) // 2] * 1e6,
        "connect_p99_us": lat[int(len(lat) * 0.99) - 1] * 1e6,
        "connect_mean_us": statistics.mean(lat) * 1e6,
        "bulk_mb_s": statistics.median(rates),
    }))


# ---------------------------------------------------------------- host cost
def host_cost(a, args, start_node, stop_node, node):
    """The same client outside every job: no node (no hooks) against a node
    with `watch.host` on, interleaved; CPU time of the whole machine per
    connection from /proc/stat."""
    def cpu():
        f = open("/proc/stat").readline().split()[1:8]
        return sum(int(x) for x in f) - int(f[3]) - int(f[4])  # busy jiffies

    def forwarded():
        st = subprocess.run([a.sluice, "--socket", a.socket_path, "status", "--json"],
                            capture_output=True, text=True, check=True).stdout
        return json.loads(st)["connections_forwarded"]

    results = {"no node": [], "watch.host": []}
    for _ in range(2):
        for side in ["watch.host", "no node"]:
            if side == "no node" and node is not None:
                stop_node(node)
                node = None
            if side == "watch.host" and node is None:
                node = start_node()
            before = forwarded() if node is not None else 0
            c0 = cpu()
            r = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
            if side == "watch.host" and a.all_egress and forwarded() - before < a.connects:
                sys.exit("watch.host: the host's :443 connections did not go through the node")
            r["cpu_us_per_connect"] = (cpu() - c0) * 1e6 / os.sysconf("SC_CLK_TCK") / (a.connects + a.rounds)
            results[side].append(r)
    if node is not None:
        stop_node(node)
    title = ("every :443 connection of the host redirected and spliced"
             if a.all_egress else "connections to addresses that are not targets")
    print("\nSluice watch.host cost for a host process outside the jobs: %s "
          "(%d connects x2, %d MiB x %d x2; best of runs)" % (title, a.connects, a.bulk_mb, a.rounds))
    print("%-22s %12s %12s %8s" % ("metric", "no node", "watch.host", "ratio"))
    for key, lower in [("connect_p50_us", True), ("connect_p99_us", True),
                       ("connect_mean_us", True), ("bulk_mb_s", False),
                       ("cpu_us_per_connect", True)]:
        vals = {s: [r[key] for r in results[s]] for s in results}
        pick = min if lower else max
        dv, hv = pick(vals["no node"]), pick(vals["watch.host"])
        print("%-22s %12.1f %12.1f %8.2f" % (key, dv, hv, hv / dv))


# ---------------------------------------------------------------- driver
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--connects", type=int, default=2000)
    ap.add_argument("--bulk-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--all-egress", action="store_true",
                    help="redirect every :443 connection, TLS to a non-target name (spliced)")
    ap.add_argument("--host-cost", action="store_true",
                    help="a host process outside the jobs: no node vs watch.host on")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (eBPF, cgroups, network namespaces)")

    me = os.path.abspath(__file__)
    sh("ip netns del %s" % NS, check=False)
    sh("ip link del %s" % HOST_IF, check=False)
    sh("ip netns add %s" % NS)
    sh("ip link add %s type veth peer name %s" % (HOST_IF, PEER_IF))
    sh("ip link set %s netns %s" % (PEER_IF, NS))
    sh("ip addr add %s/24 dev %s && ip link set %s up" % (HOST_IP, HOST_IF, HOST_IF))
    sh("ip netns exec %s sh -c 'ip link set lo up && ip addr add %s/24 dev %s && ip link set %s up'"
       % (NS, REMOTE_IP, PEER_IF, PEER_IF))
    tmp = tempfile.mkdtemp(prefix="sluice-bench-")
    if a.all_egress:
        cert, key = os.path.join(tmp, "srv.crt"), os.path.join(tmp, "srv.key")
        sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 "
           "-subj /CN=%s -keyout %s -out %s" % (SPLICED_NAME, key, cert))
        server = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, me,
                                   "--serve-tls", cert, key])
    else:
        server = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, me, "--serve"])
    cg = os.path.join(cgroup2_root(), "sluice-bench")
    os.makedirs(cg, exist_ok=True)
    cfg = os.path.join(tmp, "bench.yaml")
    with open(cfg, "w") as f:
        f.write("proxy:\n  port: 15999\nwatch:\n  host: {enabled: %s}\n  cgroups: [{path: sluice-bench}]\n"
                % ("true" if a.host_cost else "false"))
        if a.host_cost and not a.all_egress:
            # A target elsewhere: the client's own server is not one.
            f.write("targets:\n  - name: bench\n    addresses: [\"10.213.0.3\"]\n    ports: [%d]\n"
                    % PING_PORT)
        elif a.all_egress:
            f.write("targets:\n  - name: saas\n    addresses: [\"0.0.0.0/0\", \"::/0\"]\n"
                    "    ports: [443]\n    tls: intercept\n    unknown_sni: splice\n"
                    "    sni: [api.bench.test]\n")
        else:
            f.write("targets:\n  - name: bench\n    addresses: [\"%s\"]\n    ports: [%d, %d]\n"
                    % (REMOTE_IP, PING_PORT, BULK_PORT))
    sock = os.path.join(tmp, "control.sock")

    def start_node():
        n = subprocess.Popen([a.sluice, "--socket", sock, "run", "--config", cfg,
                              "--state-dir", os.path.join(tmp, "state")],
                             stderr=open(os.path.join(tmp, "sluice.log"), "a"),
                             env=dict(os.environ, SLUICE_LOG="warn"))
        for _ in range(200):
            if subprocess.run([a.sluice, "--socket", sock, "status"], capture_output=True).returncode == 0:
                return n
            time.sleep(0.1)
        sys.exit("sluice did not start; see %s/sluice.log" % tmp)

    def stop_node(n):
        n.terminate()
        n.wait()
        subprocess.run([a.sluice, "detach", "--config", cfg], capture_output=True)

    node = start_node()
    try:
        for _ in range(100):
            port = TLS_PORT if a.all_egress else PING_PORT
            try:
                socket.create_connection((REMOTE_IP, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        mode = "--tls-client" if a.all_egress else "--client"
        args = [sys.executable, me, mode, str(a.connects), str(a.bulk_mb << 20), str(a.rounds)]
        if a.host_cost:
            a.socket_path = sock
            host_cost(a, args, start_node, stop_node, node)
            node = None
            return
        # Interleave runs so that machine noise hits both sides alike.
        results = {"direct": [], "sluice": []}
        for _ in range(2):
            d = subprocess.run(args, capture_output=True, text=True, check=True)
            results["direct"].append(json.loads(d.stdout))
            v = subprocess.run(["sh", "-c", 'echo $$ > %s/cgroup.procs && exec "$@"' % cg, "sh"] + args,
                               capture_output=True, text=True, check=True)
            results["sluice"].append(json.loads(v.stdout))
        st = json.loads(subprocess.run([a.sluice, "--socket", sock, "status", "--json"],
                                       capture_output=True, text=True, check=True).stdout)
        expected = 2 * (a.connects + a.rounds)
        if st["connections_forwarded"] < expected:
            sys.exit("only %d of %d connections went through sluice" % (st["connections_forwarded"], expected))

        def best(side, key, lower_is_better):
            vals = [r[key] for r in results[side]]
            return min(vals) if lower_is_better else max(vals)

        title = ("all-egress splice (every :443 redirected, TLS to a non-target name)"
                 if a.all_egress else "passthrough")
        print("\nSluice %s benchmark (%d connects x2, %d MiB x %d x2; best of runs)"
              % (title, a.connects, a.bulk_mb, a.rounds))
        print("%-22s %12s %12s %8s" % ("metric", "direct", "via sluice", "ratio"))
        for key, lower in [("connect_p50_us", True), ("connect_p99_us", True),
                           ("connect_mean_us", True), ("bulk_mb_s", False)]:
            dv, sv = best("direct", key, lower), best("sluice", key, lower)
            print("%-22s %12.1f %12.1f %8.2f" % (key, dv, sv, sv / dv))
        print("(latency ratio >1 = slower through Sluice; throughput ratio <1 = less throughput)")
        print("connections through sluice: %d" % st["connections_forwarded"])
    finally:
        if node is not None:
            node.terminate()
            node.wait()
        # The node leaves its hooks pinned (fail closed); remove them.
        subprocess.run([a.sluice, "detach", "--config", cfg], capture_output=True)
        server.kill()
        sh("ip netns del %s" % NS, check=False)
        sh("ip link del %s" % HOST_IF, check=False)
        try:
            os.rmdir(cg)
        except OSError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve()
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve-tls":
        serve_tls(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--client":
        client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--tls-client":
        tls_client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
