#!/usr/bin/env bash
# Idempotent machine set-up for building and testing Sluice.
# Installs: Debian packages (hyperscan, bpftool, postgres, iproute2, curl,
# libclang for the bindings of the real Postgres parser, libpg_query),
# Python test clients (openai, grpcio, websockets, brotli, zstandard),
# Node.js with connect-node (the Connect/gRPC test), the nightly rust-src
# component, and bpf-linker built against the nightly's own LLVM (see
# shared/TOOLCHAIN.md). Fast when everything is already there.
set -euo pipefail

need_apt=()
# prometheus and nats-server: the real scraper and evidence stream of the
# fleet tests (their own services are kept from starting: the tests run
# theirs on loopback).
# libsqlite3-dev: the console's embedded store; chromium and chromium-driver:
# the real browser the console's pages are tested in (headless).
# The secret and personal-data packs' precision corpus (node-agent/tests/
# pack.rs): code and data in the languages and formats an AI answer
# carries — Go (golang-src), Java (openjdk-17-source), TypeScript
# (node-typescript), minified JS with source maps (libjs-*), SVG
# (adwaita-icon-theme), C headers, CA certificates.
for pkg in libhyperscan-dev pkg-config gcc libc6-dev bpftool iproute2 curl openssl ca-certificates python3 postgresql libclang-dev prometheus nats-server libsqlite3-dev chromium chromium-driver golang-src openjdk-17-source node-typescript libjs-jquery libjs-bootstrap4 libjs-d3 adwaita-icon-theme unzip; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  made_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
fi

# Real clients and servers for the end-to-end suite: the `openai` and
# `anthropic` libraries,
# grpcio (gRPC client and server), websockets, brotli and zstandard (the
# fake API's compressed answers), psycopg 3 (a real Postgres driver, with its
# own libpq). Pinned so a fresh machine tests the same.
# selenium: the WebDriver client that drives Chromium (through Debian's
# chromedriver, never a downloaded one) in the console's tests.
# mcp: the Model Context Protocol SDK (a real MCP server and client over
# streamable HTTP, for the tool-call guard's end-to-end test).
PY_PKGS=(openai==3.57.0 anthropic==2.14.0 grpcio==1.85.3 websockets==17.4 brotli==1.2.1 zstandard==0.25.0 psycopg[binary]==3.2.13 selenium==4.38.0 mcp==1.27.0)
if ! python3 -c 'import openai, anthropic, grpc, websockets, brotli, zstandard, psycopg, selenium, mcp' >/dev/null 2>&1; then
  echo "setup: installing Python packages: ${PY_PKGS[*]}"
  python3 -m pip install --quiet --disable-pip-version-check "${PY_PKGS[@]}"
fi

# The real Connect implementation (connect-node client and server,
# protobuf-es) for the Connect/gRPC/gRPC-Web end-to-end test, pinned by
# tests/fixtures/connect/package.json and installed outside the checkout.
# Node.js 20 is the floor of these releases (connect-node 2.2 needs 22).
CONNECT_DIR=/var/cache/sluice-test/connect
CONNECT_PKG="$(dirname "$0")/../tests/fixtures/connect/package.json"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing Node.js and npm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if ! cmp -s "$CONNECT_PKG" "$CONNECT_DIR/package.json" || [[ ! -d "$CONNECT_DIR/node_modules/@connectrpc/connect-node" ]]; then
  echo "setup: installing connect-node and protobuf-es into $CONNECT_DIR"
  mkdir -p "$CONNECT_DIR"
  cp "$CONNECT_PKG" "$CONNECT_DIR/package.json"
  (cd "$CONNECT_DIR" && npm install --no-audit --no-fund --no-package-lock --silent)
fi

if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  echo "setup: adding rust-src to the nightly toolchain"
  rustup component add rust-src --toolchain nightly
fi

if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version >/dev/null 2>&1; then
  echo "setup: building bpf-linker against the nightly's LLVM"
  sysroot="$(rustc +nightly --print sysroot)"
  lib="$(cd "$sysroot/lib" && ls libLLVM.so.* | head -n1)"
  prefix="${CARGO_HOME:-$HOME/.cargo}/llvm-nightly-prefix"
  mkdir -p "$prefix/lib"
  ln -sf "$sysroot/lib/$lib" "$prefix/lib/libLLVM.so"
  ln -sf "$sysroot/lib/$lib" "$prefix/lib/$lib"
  LLVM_PREFIX="$prefix" cargo +nightly install bpf-linker --locked \
    --no-default-features --features llvm-22
fi
# Postgres invisibility suite (tests/e2e/pg_regress.rs): PostgreSQL 15's own
# regression SQL, from Debian's `postgresql-15` source package, unpacked into
# a cache directory (never into the repository). A deb-src entry of its own
# (bookworm main: the security archive's pool is not always mirrored) so the
# machine's other sources are left as they are. The server under test is
# the installed one; both runs use the same SQL, so a point-release
# difference between the two changes nothing that is compared.
PG_REGRESS_CACHE=/var/cache/sluice-test/pg-regress
if [[ ! -f "$PG_REGRESS_CACHE/ready" ]]; then
  echo "setup: fetching PostgreSQL 15's regression suite (Debian source package)"
  src_list=/etc/apt/sources.list.d/sluice-test-deb-src.sources
  if [[ ! -f "$src_list" ]]; then
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$src_list"
  fi
  apt-get update -qq
  dpkg -s dpkg-dev >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
  rm -rf "$PG_REGRESS_CACHE.tmp" && mkdir -p "$PG_REGRESS_CACHE.tmp"
  (cd "$PG_REGRESS_CACHE.tmp" && apt-get source -qq --download-only postgresql-15 >/dev/null \
    && dpkg-source --no-check -x postgresql-15_*.dsc src >/dev/null)
  rm -rf "$PG_REGRESS_CACHE" && mkdir -p "$PG_REGRESS_CACHE"
  mv "$PG_REGRESS_CACHE.tmp/src/src/test/regress" "$PG_REGRESS_CACHE/regress"
  rm -rf "$PG_REGRESS_CACHE.tmp"
  touch "$PG_REGRESS_CACHE/ready"
fi
# Benchmarks only (`scripts/setup.sh bench`, run by `cargo xtask bench`): a
# real upstream and real load tools. The package's own nginx service is kept
# from starting (policy-rc.d for the install): the bench runs its own, in a
# network namespace.
if [[ "${1:-}" == "bench" ]]; then
  need_bench=()
  for pkg in nginx wrk nghttp2-client pgbouncer; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_bench+=("$pkg")
  done
  if ((${#need_bench[@]})); then
    echo "setup: installing benchmark packages: ${need_bench[*]}"
    export DEBIAN_FRONTEND=noninteractive
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      made_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_bench[@]}" >/dev/null
    if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
  fi
fi
echo "setup: ok"
