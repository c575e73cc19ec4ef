#!/usr/bin/env python3
"""Postgres benchmark: pgbench TPS direct vs through Sluice, side by side
in one run.

  direct  pgbench -> the server (TLS, SCRAM with the role's password)
  sluice  pgbench in a watched cgroup -> eBPF redirect -> Sluice (client
          TLS terminated with the node CA, the node's own SCRAM-PLUS login
          upstream, every statement classified with libpg_query, judged by
          a statement rule, recorded; rows under a masking rule) -> server

  pgbouncer  the peer: Debian's PgBouncer (C, single-threaded, session
          pooling) terminating the client's TLS and opening its own to the
          server, with SCRAM on both sides: the same hops as the node, none
          of its work on statements (no parse, no rules, no records). It
          shows what two TLS sessions and four sockets per statement cost on
          this machine before Sluice does anything.

Workloads: select-only (-S) and TPC-B (pgbench's default), at 1 and 8
clients, best of --runs interleaved runs of --secs seconds each. The server
(Debian's PostgreSQL, initdb'd into a temporary directory, fsync off) lives
in a network namespace this script creates (10.215.0.2). Needs root; all it
creates is removed at the end (SLUICE_BENCH_KEEP=1 keeps the directory).

    python3 xtask/bench/pg.py --sluice target/release/sluice
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import cgroup2_root, sh

NS = "sluice-pgbench"
HOST_IF, PEER_IF = "spgb0", "spgb1"
HOST_IP, DB_IP = "10.215.0.1", "10.215.0.2"
CGROUP = "sluice-pgbench"
NAME = "db.bench.test"
SLUICE_PORT = 15997
BOUNCER_PORT = 15998
PG = "/usr/lib/postgresql/15/bin"
PASSWORD = "bench-%d" % os.getpid()

BUNDLE = """version: 1
name: pgbench
credentials:
  - target: bench-db
    source: file:%(dir)s/db.pass
    user: bench
rules:
  - id: no-destructive-sql
    on: statement
    targets: [bench-db]
    sql:
      shapes: [drop, truncate, delete_without_where, alter_system, copy_program]
    action: block
  - id: mask-personal-data
    on: result
    targets: [bench-db]
    columns: ["*email*", "filler"]
    action: mask
"""


def wait_until(what, ok, timeout=30.0, proc=None):
    deadline = time.time() + timeout
    while not ok():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited (%s) before it was ready" % (what, proc.returncode))
        if time.time() > deadline:
            raise RuntimeError("timed out waiting for %s" % what)
        time.sleep(0.1)


def pgbench(conninfo, clients, select_only, secs, cgroup=None, env=None):
    args = [PG + "/pgbench", "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(secs)]
    if select_only:
        args.append("-S")
    args.append(conninfo)
    if cgroup:
        args = ["sh", "-c", 'echo $$ > %s/cgroup.procs && exec "$@"' % cgroup, "sh"] + args
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    out = r.stdout + r.stderr
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if r.returncode != 0 or not m or (failed and failed.group(1) != "0"):
        raise RuntimeError("pgbench failed (%s):\n%s" % (r.returncode, out[-3000:]))
    return float(m.group(1))


def cpu_secs(pid):
    """User + system CPU seconds of a process so far."""
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--scale", type=int, default=10)
    # Narrower runs, e.g. to profile one case: --workloads select-only --clients 8 --variants sluice
    ap.add_argument("--workloads", default="select-only,tpc-b")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--variants", default="direct,sluice,pgbouncer")
    ap.add_argument("--perf-dir", help="record a perf profile of the node and the peer for each load of the first run here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("pg bench needs root (network namespace, cgroup, eBPF)")
    sluice = os.path.abspath(a.sluice)
    tmp = tempfile.mkdtemp(prefix="sluice-pgbench-")
    os.chmod(tmp, 0o755)
    cg = os.path.join(cgroup2_root(), CGROUP)
    server = node = bouncer = None
    try:
        sh("ip netns add %s" % NS)
        sh("ip link add %s type veth peer name %s" % (HOST_IF, PEER_IF))
        sh("ip link set %s netns %s" % (PEER_IF, NS))
        sh("ip addr add %s/24 dev %s && ip link set %s up" % (HOST_IP, HOST_IF, HOST_IF))
        sh("ip netns exec %s sh -c 'ip link set lo up && ip addr add %s/24 dev %s && ip link set %s up'"
           % (NS, DB_IP, PEER_IF, PEER_IF))
        # The server's TLS identity, from a throwaway CA.
        sh("cd %s && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
           "-keyout ca.key -out ca.pem -days 2 -subj /CN=pgbench-ca 2>/dev/null && "
           "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key "
           "-out server.csr -subj /CN=%s 2>/dev/null && "
           "printf 'subjectAltName=DNS:%s\\n' > ext.cnf && "
           "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.crt "
           "-days 2 -extfile ext.cnf 2>/dev/null" % (tmp, NAME, NAME))
        pg = os.path.join(tmp, "pg")
        os.makedirs(os.path.join(pg, "sock"))
        shutil.copy(os.path.join(tmp, "server.crt"), pg)
        shutil.copy(os.path.join(tmp, "server.key"), pg)
        sh("chown -R postgres:postgres %s && chmod 600 %s/server.key" % (pg, pg))
        data = os.path.join(pg, "data")
        sh("runuser -u postgres -- %s/initdb -D %s -U postgres --auth-local=trust "
           "--auth-host=scram-sha-256 --no-sync >/dev/null" % (PG, data))
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write("listen_addresses = '%s'\nunix_socket_directories = '%s/sock'\nssl = on\n"
                    "ssl_cert_file = '%s/server.crt'\nssl_key_file = '%s/server.key'\n"
                    "fsync = off\nsynchronous_commit = off\nshared_buffers = 128MB\n"
                    % (DB_IP, pg, pg, pg))
        with open(os.path.join(data, "pg_hba.conf"), "a") as f:
            f.write("host all all 0.0.0.0/0 scram-sha-256\n")
        server = subprocess.Popen(["ip", "netns", "exec", NS, "runuser", "-u", "postgres", "--",
                                   PG + "/postgres", "-D", data],
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "pg.log"), "w"))
        sock = os.path.join(pg, "sock")
        wait_until("postgres", lambda: sh("%s/pg_isready -q -h %s" % (PG, sock), check=False).returncode == 0,
                   proc=server)
        admin = "runuser -u postgres -- %s/psql -X -q -h %s" % (PG, sock)
        sh("%s -c \"CREATE ROLE bench LOGIN PASSWORD '%s'\"" % (admin, PASSWORD))
        sh("%s -c 'CREATE DATABASE bench OWNER bench'" % admin)
        sh("runuser -u postgres -- %s/pgbench -i -q -s %d -h %s -U bench bench" % (PG, a.scale, sock))

        os.makedirs(cg, exist_ok=True)
        keys = os.path.join(tmp, "team")
        subprocess.run([sluice, "policy", "keygen", keys], check=True, capture_output=True)
        with open(os.path.join(tmp, "db.pass"), "w") as f:
            f.write(PASSWORD + "\n")
        cfg = os.path.join(tmp, "sluice.yaml")
        with open(cfg, "w") as f:
            f.write("proxy:\n  port: %d\nwatch:\n  host: {enabled: false}\n  cgroups: [{path: %s}]\n"
                    "targets:\n  - name: bench-db\n    addresses: [\"%s\"]\n    ports: [5432]\n"
                    "    tls: intercept\n    sni: [%s]\n"
                    "tls:\n  extra_upstream_roots: [\"%s/ca.pem\"]\n"
                    "policy:\n  trusted_keys: [\"%s.pub\"]\n"
                    % (SLUICE_PORT, CGROUP, DB_IP, NAME, tmp, keys))
        csock = os.path.join(tmp, "control.sock")
        state = os.path.join(tmp, "state")
        node = subprocess.Popen([sluice, "--socket", csock, "run", "--config", cfg, "--state-dir", state],
                                stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "sluice.log"), "w"),
                                env=dict(os.environ, SLUICE_LOG="warn", NO_COLOR="1"))
        wait_until("sluice", lambda: subprocess.run([sluice, "--socket", csock, "status"],
                                                    capture_output=True).returncode == 0, proc=node)
        bundle = os.path.join(tmp, "bundle.yaml")
        with open(bundle, "w") as f:
            f.write(BUNDLE % {"dir": tmp})
        subprocess.run([sluice, "policy", "sign", bundle, "--key", keys + ".key"], check=True, capture_output=True)
        subprocess.run([sluice, "--socket", csock, "policy", "push", bundle[:-5] + ".jws"], check=True,
                       capture_output=True)

        # The peer: PgBouncer with TLS on both sides, as the postgres user
        # (it refuses to run as root), serving the server's certificate.
        with open(os.path.join(pg, "userlist.txt"), "w") as f:
            f.write('"bench" "%s"\n' % PASSWORD)
        with open(os.path.join(pg, "pgbouncer.ini"), "w") as f:
            f.write("[databases]\nbench = host=%s port=5432 dbname=bench\n"
                    "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = %d\nunix_socket_dir =\n"
                    "auth_type = scram-sha-256\nauth_file = %s/userlist.txt\npool_mode = session\n"
                    "max_client_conn = 64\ndefault_pool_size = 16\n"
                    "client_tls_sslmode = require\nclient_tls_cert_file = %s/server.crt\n"
                    "client_tls_key_file = %s/server.key\nserver_tls_sslmode = verify-ca\n"
                    "server_tls_ca_file = %s/ca.pem\nlogfile = %s/pgbouncer.log\n"
                    % (DB_IP, BOUNCER_PORT, pg, pg, pg, pg, pg))
        shutil.copy(os.path.join(tmp, "ca.pem"), pg)
        sh("chown -R postgres:postgres %s && chmod 600 %s/userlist.txt" % (pg, pg))
        bouncer = subprocess.Popen(["runuser", "-u", "postgres", "--", "/usr/sbin/pgbouncer",
                                    os.path.join(pg, "pgbouncer.ini")],
                                   stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "pgbouncer.err"), "w"))
        wait_until("pgbouncer", lambda: sh("%s/pg_isready -q -h 127.0.0.1 -p %d" % (PG, BOUNCER_PORT),
                                           check=False).returncode == 0, proc=bouncer)
        # runuser stays as the parent: the CPU to count is pgbouncer's own.
        bouncer_pid = int(sh("pgrep -u postgres -x pgbouncer").stdout.split()[0])

        direct = ("host=%s hostaddr=%s dbname=bench user=bench sslmode=verify-full sslrootcert=%s/ca.pem"
                  % (NAME, DB_IP, tmp))
        via = ("host=%s hostaddr=%s dbname=bench user=bench sslmode=verify-full sslrootcert=%s/ca/ca.pem"
               % (NAME, DB_IP, state))
        peer = ("host=%s hostaddr=127.0.0.1 port=%d dbname=bench user=bench sslmode=verify-full "
                "sslrootcert=%s/ca.pem" % (NAME, BOUNCER_PORT, tmp))
        env = dict(os.environ, PGPASSWORD=PASSWORD)
        results = {}
        node_cpu = {}
        cases = [(w, int(c)) for w in a.workloads.split(",") for c in a.clients.split(",")]
        variants = a.variants.split(",")
        for run in range(a.runs):
            for (w, c) in cases:
                for variant in variants:
                    if variant == "direct":
                        tps = pgbench(direct, c, w == "select-only", a.secs, env=env)
                    else:
                        pid = node.pid if variant == "sluice" else bouncer_pid
                        before = cpu_secs(pid)
                        perf = None
                        if a.perf_dir and run == 0:
                            # A profile of the proxy under this load
                            # (perf report -i <file>); sampling costs
                            # the run a few per cent.
                            os.makedirs(a.perf_dir, exist_ok=True)
                            out = os.path.join(a.perf_dir, "%s-%s-%d.data" % (variant, w, c))
                            how = os.environ.get("SLUICE_BENCH_PERF", "record -q -g -F 999").split()
                            perf = subprocess.Popen(["perf"] + how + ["-p", str(pid), "-o", out],
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        if variant == "sluice":
                            tps = pgbench(via, c, w == "select-only", a.secs, cgroup=cg)
                        else:
                            tps = pgbench(peer, c, w == "select-only", a.secs, env=env)
                        if perf is not None:
                            perf.send_signal(signal.SIGINT)
                            perf.wait()
                        # CPU per transaction (connection set-up included).
                        used = cpu_secs(pid) - before
                        k = (w, c, variant)
                        node_cpu[k] = min(node_cpu.get(k, 1e9), used / max(tps * a.secs, 1) * 1e6)
                    key = (w, c, variant)
                    results[key] = max(results.get(key, 0.0), tps)
                    print("run %d %-11s %d client(s) %-6s %9.0f tps" % (run + 1, w, c, variant, tps), flush=True)
        status = subprocess.run([sluice, "--socket", csock, "status", "--json"], capture_output=True, text=True)
        print()
        print("pgbench through Sluice (TLS both sides, node SCRAM-PLUS login, per-statement audit,")
        print("a statement rule and a masking rule), best of %d runs of %ds, scale %d:" % (a.runs, a.secs, a.scale))
        print()
        print("| workload | clients | direct tps | Sluice tps | Sluice / direct | PgBouncer / direct "
              "| Sluice / PgBouncer | CPU per transaction: Sluice, PgBouncer |")
        print("|---|---|---|---|---|---|---|---|")
        for (w, c) in cases:
            if len(variants) < 3:
                continue
            d, s, b = (results[(w, c, v)] for v in ("direct", "sluice", "pgbouncer"))
            print("| %s | %d | %.0f | %.0f | %.2f× | %.2f× | %.2f× | %.0f µs, %.0f µs |"
                  % (w, c, d, s, s / d, b / d, s / b, node_cpu[(w, c, "sluice")], node_cpu[(w, c, "pgbouncer")]))
        if status.returncode == 0:
            print("\nnode status after the run: %s" % status.stdout.strip()[:400])
    finally:
        if node is not None:
            node.terminate()
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.kill()
            subprocess.run([sluice, "detach", "--config", os.path.join(tmp, "sluice.yaml")], capture_output=True)
        if bouncer is not None:
            sh("pkill -INT -u postgres -x pgbouncer", check=False)
            try:
                bouncer.wait(timeout=10)
            except subprocess.TimeoutExpired:
                bouncer.kill()
        if server is not None:
            server.send_signal(2)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
            # runuser may go before its postgres does: stop it by its data dir.
            sh("pkill -INT -f 'postgres -D %s'" % os.path.join(tmp, "pg", "data"), check=False)
            time.sleep(1)
            sh("pkill -KILL -f 'postgres -D %s'" % os.path.join(tmp, "pg", "data"), check=False)
        sh("ip netns del %s" % NS, check=False)
        sh("ip link del %s" % HOST_IF, check=False)
        try:
            os.rmdir(cg)
        except OSError:
            pass
        if os.environ.get("SLUICE_BENCH_KEEP"):
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
