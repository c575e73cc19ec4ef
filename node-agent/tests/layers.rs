//! The node's modules form layers: no import cycle among them, and the
//! lower layers (records, configuration, identity types, names, kernel
//! layout, scanning) import nothing above them. Read from the sources, so
//! a `use` that climbs a layer fails here before review.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// What each top-level module of `src/` names of its siblings (`crate::x`
/// paths and `use crate::{x, y::z}` groups), tests excluded.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let module = |p: &Path| {
        let rel = p.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str();
        first.to_string_lossy().trim_end_matches(".rs").to_owned()
    };
    let names: BTreeSet<String> = files.iter().map(|p| module(p)).collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let m = module(f);
        if m == "main" || m == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let deps = out.entry(m.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + 7..];
            if let Some(group) = rest.strip_prefix('{') {
                // Top-level names of the group, nested groups skipped.
                let mut depth = 0;
                let mut cur = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            deps.insert(cur.trim().split("::").next().unwrap_or("").to_owned());
                            cur.clear();
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 {
                        cur.push(c);
                    }
                }
                deps.insert(cur.trim().split("::").next().unwrap_or("").to_owned());
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                deps.insert(name);
            }
        }
        deps.retain(|d| d != &m && names.contains(d));
    }
    out
}

#[test]
fn the_node_modules_import_each_other_in_no_cycle() {
    let deps = imports();
    assert!(deps.len() > 20, "{deps:?}");
    // Depth-first search with colours: a grey node reached again is a cycle.
    fn visit<'a>(
        m: &'a str,
        deps: &'a BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match colour.get(m) {
            Some(1) => {
                let at = path.iter().position(|p| *p == m).unwrap_or(0);
                let mut cycle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
                cycle.push(m.to_owned());
                return Some(cycle);
            }
            Some(2) => return None,
            _ => {}
        }
        colour.insert(m, 1);
        path.push(m);
        for d in deps.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, deps, colour, path) {
                return Some(c);
            }
        }
        path.pop();
        colour.insert(m, 2);
        None
    }
    let mut colour = BTreeMap::new();
    for m in deps.keys() {
        if let Some(cycle) = visit(m, &deps, &mut colour, &mut Vec::new()) {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
}

#[test]
fn lower_layers_import_nothing_above_them() {
    let deps = imports();
    // Each lower module and what it may import (only other lower ones).
    let lower: &[(&str, &[&str])] = &[
        ("names", &[]),
        ("addr", &[]),
        ("btf", &[]),
        ("identity", &[]),
        ("scan", &[]),
        ("tls", &["names"]),
        ("config", &["names", "tls"]),
        ("record", &["addr", "config", "identity"]),
    ];
    for (m, allowed) in lower {
        let got = deps.get(*m).unwrap_or_else(|| panic!("no module {m}"));
        let above: Vec<_> = got
            .iter()
            .filter(|d| !allowed.contains(&d.as_str()))
            .collect();
        assert!(above.is_empty(), "`{m}` imports {above:?}, above it");
    }
}
