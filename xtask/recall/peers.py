#!/usr/bin/env python3
"""Recall and false positives of Sluice's packs on other scanners' own
published test cases: gitleaks' rule tests, trufflehog's detector tests and
Yelp detect-secrets' plugin tests.

Their repositories are read where `--gitleaks`, `--trufflehog` and
`--detect-secrets` point (checkouts fetched at measurement time; none of
their material is committed here). Only literal cases are taken: strings
their tests spell out, not ones their generators make at run time.

Every case goes through `sluice policy test`, which runs the node's own
scanner and stream masker (tests/e2e checks that its output is what a
client gets through a node): plain, and as an OpenAI-style stream of
5-character deltas. A true positive counts as found when the secret the
suite expects (or, without one, the case) no longer appears whole in the
output (host names, separators and pieces with a space among what it
expects are context, not secrets); a false-positive case counts as changed when the output differs.

    python3 xtask/recall/peers.py --sluice target/release/sluice \\
        --gitleaks DIR --trufflehog DIR --detect-secrets DIR [--misses]
"""
import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict

BUNDLE = """version: 1
name: recall
rules:
  - id: mask
    on: response
    packs: [secrets, pii]
    action: mask
"""

SEP = "\n\n#=#=#\n\n"


# ------------------------------------------------------------- Go literals

def go_string(tok):
    if tok.startswith("`"):
        return tok[1:-1]
    try:
        return ast.literal_eval(tok)
    except Exception:
        return None


LIT = re.compile(r'"(?:[^"\\\n]|\\.)*"|`[^`]*`', re.S)


def literal_at(src, i):
    m = LIT.match(src, i)
    return m


def block_end(src, i):
    """Index after the bracket that closes the one opened before `i`."""
    depth = 1
    while i < len(src) and depth:
        c = src[i]
        if c in "\"`":
            m = literal_at(src, i)
            if m:
                i = m.end()
                continue
        if c == "/" and src.startswith("//", i):
            j = src.find("\n", i)
            i = len(src) if j < 0 else j
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        i += 1
    return i


def top_literals(src, start, end):
    """String literals directly in src[start:end] (not inside a call),
    joining `"a" + "b"`; and (name, args) of calls with literal args."""
    out, calls = [], []
    i, depth = start, 0
    while i < end:
        c = src[i]
        if c == "/" and src.startswith("//", i):
            j = src.find("\n", i)
            i = end if j < 0 else j
            continue
        if c in "\"`":
            m = literal_at(src, i)
            if m:
                if depth == 0:
                    s = go_string(m.group(0))
                    j = m.end()
                    # A literal joined (`+`) with something made at run
                    # time is not a literal case; before or after it.
                    back = src[start:i].rstrip()
                    if back.endswith("+"):
                        s = None
                    while True:
                        k = j
                        while k < end and src[k] in " \t\n":
                            k += 1
                        if k < end and src[k] == "+":
                            k += 1
                            while k < end and src[k] in " \t\n":
                                k += 1
                            m2 = literal_at(src, k)
                            if m2 and s is not None:
                                s2 = go_string(m2.group(0))
                                s = None if s2 is None else s + s2
                                j = m2.end()
                                continue
                            s = None
                            j = k
                        break
                    if s is not None:
                        out.append(s)
                    i = j
                    continue
                i = m.end()
                continue
        if c == "(" and depth == 0:
            name = re.search(r"([\w.]+)\s*$", src[max(start, i - 80):i])
            close = block_end(src, i + 1)
            inner = src[i + 1:close - 1]
            args = [go_string(m.group(0)) for m in LIT.finditer(src, i + 1, close - 1)]
            # Only calls whose arguments are all literals (no generator).
            if name and "(" not in LIT.sub("", inner) and "+" not in LIT.sub("", inner):
                calls.append((name.group(1), args))
            i = close
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        i += 1
    return out, calls


# ------------------------------------------------------------- gitleaks

def gitleaks_cases(root):
    d = os.path.join(root, "cmd/generate/config/rules")
    tps, fps = [], []
    head = re.compile(r"\b(tps|fps)\s*(?::=|=)\s*(\[\]string\s*\{|append\(\s*(?:tps|fps)\s*,)")
    for f in sorted(os.listdir(d)):
        if not f.endswith(".go"):
            continue
        src = open(os.path.join(d, f), encoding="utf-8").read()
        for m in head.finditer(src):
            kind = m.group(1)
            end = block_end(src, m.end())
            lits, calls = top_literals(src, m.end(), end - 1)
            cases = [s for s in lits if s.strip()]
            for name, args in calls:
                args = [a for a in args if a is not None]
                if name.endswith("GenerateSampleSecret") and len(args) == 2:
                    cases.append(f'{args[0]}_api_token = "{args[1]}"')
                elif name.endswith("GenerateSampleSecrets") and len(args) == 2:
                    i, s = args
                    cases += [f'{i}Token = "{s}"', f"{i}_token: {s}", f'var {i}Token string = "{s}"']
            rule = f[:-3]
            (tps if kind == "tps" else fps).extend((rule, c, None) for c in cases)
    return tps, fps


# ------------------------------------------------------------- trufflehog

def trufflehog_cases(root):
    d = os.path.join(root, "pkg/detectors")
    tps, fps = [], []
    var = re.compile(r"\b(\w+)\s*=\s*(\"(?:[^\"\\\n]|\\.)*\"|`[^`]*`)")
    for dirpath, _, files in os.walk(d):
        for f in files:
            if not f.endswith("_test.go") or f.endswith("_integration_test.go"):
                continue
            src = open(os.path.join(dirpath, f), encoding="utf-8", errors="replace").read()
            if "_Pattern" not in src:
                continue
            names = {m.group(1): go_string(m.group(2)) for m in var.finditer(src)}
            rule = os.path.relpath(dirpath, d)
            for m in re.finditer(r"\binput:\s*", src):
                i = m.end()
                lm = literal_at(src, i)
                if lm:
                    inp = go_string(lm.group(0))
                else:
                    idm = re.match(r"(\w+)\s*,", src[i:])
                    inp = names.get(idm.group(1)) if idm else None
                if not inp:
                    continue
                w = re.search(r"\bwant:\s*", src[i:i + 4000])
                if not w:
                    continue
                j = i + w.end()
                want = None
                if src.startswith("[]string{", j):
                    end = block_end(src, j + len("[]string{"))
                    want = []
                    for lm2 in LIT.finditer(src, j, end):
                        want.append(go_string(lm2.group(0)))
                    for idm in re.finditer(r"\b([A-Za-z_]\w*)\b", src[j + 9:end - 1]):
                        if idm.group(1) in names and names[idm.group(1)]:
                            want.append(names[idm.group(1)])
                    want = [x for x in want if x]
                if want:
                    tps.append((rule, inp, want))
                else:
                    fps.append((rule, inp, None))
    return tps, fps


# ------------------------------------------------------------- detect-secrets

class NotLiteral(Exception):
    pass


def literal(node, env):
    """The value of a constant expression, with names bound earlier in the
    module and `"...".format(...)` (how detect-secrets' keyword tables are
    written); anything else is not a literal case."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(literal(e, env) for e in node.elts)
    if isinstance(node, ast.List):
        # A table keeps the rows it can read (one built at run time, e.g.
        # from base64 of random digits, is left out).
        rows = []
        for e in node.elts:
            try:
                rows.append(literal(e, env))
            except NotLiteral:
                pass
        return rows
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return literal(node.left, env) + literal(node.right, env)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format" and not node.keywords):
        fmt = literal(node.func.value, env)
        if isinstance(fmt, str):
            return fmt.format(*(literal(a, env) for a in node.args))
    raise NotLiteral


def case_tables(tree):
    """Module-level `NAME = [(line, expected_secret_or_None), ...]` tables:
    (line, secret) pairs."""
    env, out = {}, []
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)):
            continue
        try:
            v = literal(stmt.value, env)
        except (NotLiteral, ValueError, IndexError, KeyError, TypeError):
            continue
        env[stmt.targets[0].id] = v
        if (isinstance(v, list) and v and all(
                isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str)
                and (t[1] is None or isinstance(t[1], str)) for t in v)):
            out.extend(v)
    return out


def detect_secrets_cases(root):
    d = os.path.join(root, "tests/plugins")
    tps, fps = [], []
    for f in sorted(os.listdir(d)):
        if not f.endswith("_test.py"):
            continue
        src = open(os.path.join(d, f), encoding="utf-8").read()
        tree = ast.parse(src)
        # Tables of (line, expected secret): a line is a true positive when
        # any table (one per file type the plugin knows) expects a secret
        # in it, a false-positive case when none does.
        expected = {}
        for line, secret in case_tables(tree):
            if expected.get(line) is None:
                expected[line] = secret
        for line, secret in expected.items():
            if secret is None:
                fps.append((f[:-8], line, None))
            else:
                tps.append((f[:-8], line, [secret]))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            if not (isinstance(fn, ast.Attribute) and fn.attr == "parametrize"):
                continue
            if len(node.args) < 2:
                continue
            try:
                names = ast.literal_eval(node.args[0])
                values = ast.literal_eval(node.args[1])
            except Exception:
                continue
            if isinstance(names, str):
                names = [n.strip() for n in names.split(",")]
            if "should_flag" not in names:
                continue
            ti = 0
            fi = names.index("should_flag")
            for v in values:
                if not isinstance(v, (tuple, list)) or not isinstance(v[ti], str):
                    continue
                (tps if v[fi] else fps).append((f[:-8], v[ti], None))
    # A case in both a table and a parametrize list counts once.
    def once(cases):
        first = {}
        for c in cases:
            first.setdefault((c[0], c[1]), c)
        return list(first.values())
    return once(tps), once(fps)


# ------------------------------------------------------------- measuring

def run(sluice, bundle, cases, shape):
    """Outputs of `cases` through `sluice policy test` in one batch."""
    text = SEP.join(c for _, c, _ in cases)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
        path = f.name
    args = [sluice, "policy", "test", bundle, path, "--json", "--shape", shape]
    if shape == "sse":
        args += ["--delta", "5"]
    out = subprocess.run(args, capture_output=True, text=True)
    os.unlink(path)
    if out.returncode not in (0, 1):
        sys.exit(f"policy test failed: {out.stderr}")
    got = json.loads(out.stdout)[0]["output"]
    parts = got.split(SEP.strip("\n")) if shape == "sse" else None
    # Streamed output keeps characters (a masked escape is one `*`);
    # split on the separator, which holds nothing a rule masks.
    pieces = got.split(SEP)
    if len(pieces) != len(cases):
        sys.exit(f"{shape}: {len(pieces)} outputs for {len(cases)} cases")
    del parts
    return pieces


# A host name (`rwxtOp.jfrog.io`), a separator or a piece of prose or JSON
# structure (anything with a space in it) in what a suite expects is the
# detector's context, not its secret: trufflehog's detectors report
# `key + host` or `id + ":" + secret`, and a host left in the output leaks
# nothing.
HOST = re.compile(r"^(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,12}$")


def secret_parts(want):
    return [w for w in want if len(w) >= 4 and not HOST.match(w) and not re.search(r"\s", w)] or want


def found(case, want, out):
    if want:
        return all(w not in out for w in secret_parts(want))
    return out != case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--gitleaks")
    ap.add_argument("--trufflehog")
    ap.add_argument("--detect-secrets")
    ap.add_argument("--misses", action="store_true", help="list the cases missed")
    ap.add_argument("--extra-patterns", help="a YAML list of candidate patterns (pack shape) "
                    "added to the packs: try one before it goes into a pack")
    a = ap.parse_args()
    text = BUNDLE
    if a.extra_patterns:
        import yaml
        extra = yaml.safe_load(open(a.extra_patterns))
        text += "    patterns: %s\n" % json.dumps(extra)
    bundle = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    bundle.write(text)
    bundle.close()
    suites = []
    if a.gitleaks:
        suites.append(("gitleaks", *gitleaks_cases(a.gitleaks)))
    if a.trufflehog:
        suites.append(("trufflehog", *trufflehog_cases(a.trufflehog)))
    if a.detect_secrets:
        suites.append(("detect-secrets", *detect_secrets_cases(a.detect_secrets)))
    total_tp = total_found = 0
    for name, tps, fps in suites:
        # A case must not run into its neighbour: the separator is fixed.
        tps = [c for c in tps if SEP.strip() not in c[1]]
        fps = [c for c in fps if SEP.strip() not in c[1]]
        line = [f"{name}: {len(tps)} true-positive cases ({len({r for r, _, _ in tps})} rules)"]
        for shape in ("plain", "sse"):
            outs = run(a.sluice, bundle.name, tps, shape)
            ok = [found(c, w, o) for (_, c, w), o in zip(tps, outs)]
            n = sum(ok)
            line.append(f"{shape} {n}/{len(tps)} = {100 * n / max(1, len(tps)):.1f}%")
            if shape == "plain":
                total_tp += len(tps)
                total_found += n
                missed = defaultdict(list)
                for (r, c, _), k in zip(tps, ok):
                    if not k:
                        missed[r].append(c)
        fouts = run(a.sluice, bundle.name, fps, "plain") if fps else []
        changed = [(r, c) for (r, c, _), o in zip(fps, fouts) if o != c]
        line.append(f"false-positive cases changed {len(changed)}/{len(fps)}")
        print("; ".join(line))
        if a.misses:
            for r, cs in sorted(missed.items()):
                for c in cs:
                    print(f"  miss {name}/{r}: {c[:160]!r}")
            for r, c in changed:
                print(f"  changed {name}/{r}: {c[:160]!r}")
    print(f"all: {total_found}/{total_tp} = {100 * total_found / max(1, total_tp):.1f}% (plain)")
    os.unlink(bundle.name)


if __name__ == "__main__":
    main()
