#!/usr/bin/env python3
"""Console store benchmark: `sluice-console bench` (generated evidence
through the ingest path, then the sessions page's searches) on the
embedded SQLite store and on a throwaway PostgreSQL cluster (Debian's
PostgreSQL 15, initdb'd into a temporary directory, Unix socket only).
Prints each store's JSON report and a summary table."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

PG = "/usr/lib/postgresql/15/bin"


def bench(console, store, exchanges):
    args = [console, "bench", "--exchanges", str(exchanges)]
    if store:
        args += ["--store", store]
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def summary(r):
    print("\n%s: %d exchanges in %d sessions, %d events ingested at %.0f events/s (chain check + store + projection)"
          % (r["store"], r["exchanges"], r["sessions"], r["events"], r["ingest_events_per_second"]))
    print("%-26s %10s %10s %10s" % ("search", "found", "p50 ms", "p95 ms"))
    for s in r["searches"]:
        print("%-26s %10d %10.2f %10.2f" % (s["search"], s["sessions_found"], s["p50_ms"], s["p95_ms"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--console", required=True)
    ap.add_argument("--exchanges", type=int, default=1_000_000)
    # PostgreSQL commits (and fsyncs) each event on its own, as ingest
    # does: a smaller run gives its rate without taking an hour.
    ap.add_argument("--pg-exchanges", type=int, default=100_000)
    a = ap.parse_args()
    reports = [bench(a.console, None, a.exchanges)]
    summary(reports[0])
    sys.stdout.flush()
    tmp = tempfile.mkdtemp(prefix="sluice-console-bench-")
    os.chmod(tmp, 0o755)
    server = None
    try:
        data, sock = os.path.join(tmp, "data"), os.path.join(tmp, "sock")
        os.makedirs(sock)
        subprocess.run(["chown", "-R", "postgres:postgres", tmp], check=True)
        subprocess.run(["runuser", "-u", "postgres", "--", PG + "/initdb", "-D", data, "-U", "postgres",
                        "--auth-local=trust", "--no-sync"], check=True, capture_output=True)
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write("listen_addresses = ''\nunix_socket_directories = '%s'\nshared_buffers = 256MB\n" % sock)
        server = subprocess.Popen(["runuser", "-u", "postgres", "--", PG + "/postgres", "-D", data],
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "pg.log"), "w"))
        for _ in range(100):
            if subprocess.run([PG + "/pg_isready", "-q", "-h", sock]).returncode == 0:
                break
            time.sleep(0.2)
        url = "postgres://postgres@%s/postgres" % sock.replace("/", "%2F")
        reports.append(bench(a.console, url, a.pg_exchanges))
        summary(reports[1])
    finally:
        if server:
            server.terminate()
            server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    for r in reports:
        print(json.dumps(r))


if __name__ == "__main__":
    sys.exit(main())
