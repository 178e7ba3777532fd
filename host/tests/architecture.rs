//! The house's rules a newcomer relies on: one file per mechanism, and no
//! two modules that import each other (each can be read knowing only what
//! it uses, never what uses it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Source without comments, and without its `#[cfg(test)] mod tests`.
fn code_of(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while let Some(i) = rest.find('/') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("//") {
            rest = tail.find('\n').map_or("", |n| &tail[n..]);
        } else if tail.starts_with("/*") {
            rest = tail.find("*/").map_or("", |n| &tail[n + 2..]);
        } else {
            out.push('/');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    match out.find("#[cfg(test)]\nmod tests") {
        Some(i) => out[..i].to_string(),
        None => out,
    }
}

/// Each top-level module of the Host and the top-level modules it names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let top = rel
                .split('/')
                .next()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" || top == "main" || !rel.ends_with(".rs") {
                continue;
            }
            let code = code_of(&std::fs::read_to_string(&path).unwrap());
            let used = map.entry(top.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if name != top && !name.is_empty() {
                    used.insert(name);
                }
            }
        }
    }
    map
}

#[test]
fn no_two_modules_import_each_other() {
    let map = imports();
    assert!(map.len() > 10, "found only {map:?}");
    let mut pairs = Vec::new();
    for (a, used) in &map {
        for b in used {
            if a < b && map.get(b).is_some_and(|u| u.contains(a)) {
                pairs.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(
        pairs.is_empty(),
        "modules that import each other: {pairs:?}"
    );
}
