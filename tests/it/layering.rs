//! The layering gate: no import cycle among the top-level modules of `src/`.
//!
//! Every `src/**/*.rs` file is read and its references to other modules of
//! the crate are collected: `crate::x` paths anywhere in code (in `use`
//! declarations, grouped `crate::{x, y::z}` imports, expressions, types and
//! `$crate::` in macros) and `super::` paths resolved against the file's (and
//! its inline `mod` blocks') place in the module tree. The graph is kept at
//! top-level-module granularity: `src/store/write.rs` counts as `store`,
//! `src/domain/event.rs` as `domain`; `lib.rs` and `main.rs` are the crate
//! root, not a module. Comments, string literals and `#[cfg(test)]` items
//! (and the files of `#[cfg(test)] mod x;` declarations) are ignored: the
//! layering is a property of the shipped code, and a unit test may reach
//! across layers to build its fixtures.
//!
//! On failure the test lists each cycle as a path (`api -> resync -> api`)
//! with the file and line of each import on it, and prints the whole graph.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

#[test]
fn no_import_cycle_among_the_modules_of_src() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect_rs(&src, &src, &mut files);
    let graph = module_graph(&files);
    let edges: usize = graph.edges.values().map(BTreeMap::len).sum();
    eprintln!("module graph of src/ (from -> to: first reference):");
    for (from, tos) in &graph.edges {
        for (to, site) in tos {
            eprintln!("  {from} -> {to}: {site}");
        }
    }
    assert!(
        graph.modules.len() > 3 && edges > 3,
        "the scan found {} modules and {edges} imports in {}: the scanner is broken",
        graph.modules.len(),
        src.display()
    );
    let cycles = cycles(&graph);
    assert!(
        cycles.is_empty(),
        "import cycles among the modules of src/ (a module must not import a module \
         that imports it back, directly or through others):\n{}",
        describe(&graph, &cycles)
    );
}

/// The layers of `src/`, bottom first (docs/ARCHITECTURE.md): a module may
/// import modules of its own layer or below, never above. A new module
/// must be placed here, which is the point: where it sits is a decision.
const LAYERS: &[&[&str]] = &[
    &["domain"],
    &["clock", "config", "gen"],
    &["store"],
    &["metrics", "worker"],
    &["status", "state"],
    &["ingest", "resync", "maintenance", "systemd", "follower"],
    &["server", "api"],
    &["node"],
    &["demo"],
    &["cli"],
];

#[test]
fn every_module_imports_only_its_own_layer_or_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect_rs(&src, &src, &mut files);
    let graph = module_graph(&files);
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    let unplaced: Vec<&String> = graph
        .modules
        .iter()
        .filter(|m| layer(m).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules with no layer in tests/it/layering.rs LAYERS (place them): {unplaced:?}"
    );
    let mut upward = Vec::new();
    for (from, tos) in &graph.edges {
        for (to, site) in tos {
            if layer(to) > layer(from) {
                upward.push(format!("  {from} -> {to}: {site}"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that go up the layers (domain → … → cli):\n{}",
        upward.join("\n")
    );
}

/// A place in `src/` where one module refers to another.
#[derive(Clone, Debug, PartialEq)]
struct Site {
    file: String,
    line: usize,
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "src/{}:{}", self.file, self.line)
    }
}

#[derive(Debug, Default)]
struct Graph {
    modules: BTreeSet<String>,
    /// from -> to -> the first reference found.
    edges: BTreeMap<String, BTreeMap<String, Site>>,
}

/// Every `.rs` file under `dir`, as (path relative to `root`, contents).
fn collect_rs(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_rs(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            out.push((path.strip_prefix(root).unwrap().to_owned(), text));
        }
    }
}

/// The module path of a file relative to `src/`: `store/write.rs` →
/// `[store, write]`, `store/mod.rs` → `[store]`; empty for the crate roots.
fn module_path(file: &Path) -> Vec<String> {
    let mut parts: Vec<String> = file
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    let at_root = parts.is_empty();
    if !(stem == "mod" || at_root && (stem == "lib" || stem == "main")) {
        parts.push(stem.to_owned());
    }
    parts
}

fn module_graph(files: &[(PathBuf, String)]) -> Graph {
    let mut graph = Graph::default();
    for (file, _) in files {
        if let Some(top) = module_path(file).first() {
            graph.modules.insert(top.clone());
        }
    }
    let tokenized: Vec<_> = files
        .iter()
        .map(|(file, text)| (file, module_path(file), tokens(text)))
        .collect();
    // Files that exist only for tests: `#[cfg(test)] mod x;`.
    let mut test_only = BTreeSet::new();
    for (_, path, toks) in &tokenized {
        scan(toks, path, &mut |r| {
            if let Ref::TestOnlyModFile(p) = r {
                test_only.insert(p);
            }
        });
    }
    for (file, path, toks) in &tokenized {
        let Some(own) = path.first() else { continue };
        if test_only.contains(path) {
            continue;
        }
        let file_name = file.to_string_lossy().into_owned();
        scan(toks, path, &mut |r| {
            if let Ref::Module(target, line) = r {
                if &target != own && graph.modules.contains(&target) {
                    graph
                        .edges
                        .entry(own.clone())
                        .or_default()
                        .entry(target)
                        .or_insert_with(|| Site {
                            file: file_name.clone(),
                            line,
                        });
                }
            }
        });
    }
    graph
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Open(char),
    Close(char),
    Other(char),
}

/// Rust source to tokens (with their line), without comments, string, char
/// and number literals or lifetimes.
fn tokens(src: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    // Skips a quoted literal starting at the quote `c[i]`; with `hashes`
    // (raw strings) there are no escapes and the end is `"` + hashes.
    let skip_string = |i: &mut usize, line: &mut usize, raw: Option<usize>| {
        *i += 1;
        while *i < c.len() {
            match c[*i] {
                '\n' => *line += 1,
                '\\' if raw.is_none() => {
                    if c.get(*i + 1) == Some(&'\n') {
                        *line += 1;
                    }
                    *i += 1;
                }
                '"' => {
                    let n = raw.unwrap_or(0);
                    if (1..=n).all(|k| c.get(*i + k) == Some(&'#')) {
                        *i += 1 + n;
                        return;
                    }
                }
                _ => {}
            }
            *i += 1;
        }
    };
    while i < c.len() {
        let ch = c[i];
        match ch {
            '\n' => {
                line += 1;
                i += 1;
            }
            _ if ch.is_whitespace() => i += 1,
            '/' if c.get(i + 1) == Some(&'/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if c.get(i + 1) == Some(&'*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        if c[i] == '\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                }
            }
            '"' => skip_string(&mut i, &mut line, None),
            '\'' => {
                // 'x', '\n', '\u{..}' are chars; 'a (no closing quote) a lifetime.
                if c.get(i + 1) == Some(&'\\') {
                    i += 2;
                    while i < c.len() && c[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if c.get(i + 2) == Some(&'\'') {
                    i += 3;
                } else {
                    i += 1;
                    while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                        i += 1;
                    }
                }
            }
            _ if ch.is_ascii_digit() => {
                while i < c.len()
                    && (c[i].is_alphanumeric()
                        || c[i] == '_'
                        || c[i] == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
                {
                    i += 1;
                }
            }
            _ if ch.is_alphabetic() || ch == '_' => {
                let start = i;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let prefix = matches!(word.as_str(), "r" | "b" | "br" | "c" | "cr");
                match c.get(i) {
                    Some('"') if prefix => skip_string(&mut i, &mut line, None),
                    Some('\'') if word == "b" => {} // b'x': the quote is next
                    Some('#') if prefix => {
                        let mut n = 0;
                        while c.get(i + n) == Some(&'#') {
                            n += 1;
                        }
                        if c.get(i + n) == Some(&'"') {
                            i += n;
                            skip_string(&mut i, &mut line, Some(n));
                        } else if word == "r" {
                            // r#ident: a raw identifier.
                            i += 1;
                            let start = i;
                            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                                i += 1;
                            }
                            out.push((Tok::Ident(c[start..i].iter().collect()), line));
                        } else {
                            out.push((Tok::Ident(word), line));
                        }
                    }
                    _ => out.push((Tok::Ident(word), line)),
                }
            }
            ':' if c.get(i + 1) == Some(&':') => {
                out.push((Tok::PathSep, line));
                i += 2;
            }
            '(' | '[' | '{' => {
                out.push((Tok::Open(ch), line));
                i += 1;
            }
            ')' | ']' | '}' => {
                out.push((Tok::Close(ch), line));
                i += 1;
            }
            _ => {
                out.push((Tok::Other(ch), line));
                i += 1;
            }
        }
    }
    out
}

enum Ref {
    /// A reference to the top-level module, at a line.
    Module(String, usize),
    /// The module path of a file declared by `#[cfg(test)] mod x;`.
    TestOnlyModFile(Vec<String>),
}

fn ident(toks: &[(Tok, usize)], i: usize) -> Option<&str> {
    match toks.get(i) {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

fn is(toks: &[(Tok, usize)], i: usize, t: Tok) -> bool {
    toks.get(i).is_some_and(|(x, _)| *x == t)
}

/// The index just past the balanced group opening at `toks[i]`.
fn past_group(toks: &[(Tok, usize)], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < toks.len() {
        match toks[i].0 {
            Tok::Open(_) => depth += 1,
            Tok::Close(_) => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The first segments of the paths of a `{a::b, c, d::{e}}` group at
/// `toks[i]`, with their lines.
fn group_heads(toks: &[(Tok, usize)], i: usize) -> Vec<(String, usize)> {
    let end = past_group(toks, i);
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect = false;
    for (t, line) in &toks[i..end] {
        match t {
            Tok::Open(_) => {
                depth += 1;
                expect = depth == 1;
            }
            Tok::Close(_) => depth -= 1,
            Tok::Other(',') if depth == 1 => expect = true,
            Tok::Ident(s) if expect && depth == 1 => {
                heads.push((s.clone(), *line));
                expect = false;
            }
            _ => expect = false,
        }
    }
    heads
}

/// Walks a file's tokens and reports the references to top-level modules.
/// `file_path` is the file's module path; inline `mod x { .. }` blocks
/// extend it for `super::`.
fn scan(toks: &[(Tok, usize)], file_path: &[String], report: &mut dyn FnMut(Ref)) {
    // One entry per open `{`: the inline module it opens, if any.
    let mut braces: Vec<Option<String>> = Vec::new();
    let here = |braces: &[Option<String>]| -> Vec<String> {
        let mut p = file_path.to_vec();
        p.extend(braces.iter().flatten().cloned());
        p
    };
    let mut i = 0;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Other('#') if is(toks, i + 1, Tok::Open('[')) => {
                let end = past_group(toks, i + 1);
                let attr: Vec<_> = toks[i + 2..end - 1].iter().map(|(t, _)| t).collect();
                let cfg_test = attr
                    == [
                        &Tok::Ident("cfg".into()),
                        &Tok::Open('('),
                        &Tok::Ident("test".into()),
                        &Tok::Close(')'),
                    ];
                i = end;
                if cfg_test {
                    i = skip_item(toks, i, &here(&braces), report);
                }
            }
            Tok::Ident(m) if m == "mod" && is(toks, i + 2, Tok::Open('{')) => {
                braces.push(ident(toks, i + 1).map(str::to_owned));
                i += 3;
            }
            Tok::Open('{') => {
                braces.push(None);
                i += 1;
            }
            Tok::Close('}') => {
                braces.pop();
                i += 1;
            }
            Tok::Ident(k) if k == "crate" && is(toks, i + 1, Tok::PathSep) => {
                let line = toks[i].1;
                if let Some(name) = ident(toks, i + 2) {
                    report(Ref::Module(name.to_owned(), line));
                } else if is(toks, i + 2, Tok::Open('{')) {
                    for (name, line) in group_heads(toks, i + 2) {
                        report(Ref::Module(name, line));
                    }
                }
                i += 2;
            }
            Tok::Ident(k) if k == "super" && is(toks, i + 1, Tok::PathSep) => {
                let line = toks[i].1;
                let mut n = 0;
                let mut j = i;
                while ident(toks, j) == Some("super") && is(toks, j + 1, Tok::PathSep) {
                    n += 1;
                    j += 2;
                }
                let path = here(&braces);
                if n <= path.len() {
                    let resolved = &path[..path.len() - n];
                    if let Some(top) = resolved.first() {
                        report(Ref::Module(top.clone(), line));
                    } else if let Some(name) = ident(toks, j) {
                        report(Ref::Module(name.to_owned(), line));
                    } else if is(toks, j, Tok::Open('{')) {
                        for (name, line) in group_heads(toks, j) {
                            report(Ref::Module(name, line));
                        }
                    }
                }
                i = j;
            }
            _ => i += 1,
        }
    }
}

/// Skips the item after a `#[cfg(test)]` starting at `toks[i]` (further
/// attributes included): up to its `;` or past its `{ .. }` body. A `mod x;`
/// is reported as a test-only file.
fn skip_item(
    toks: &[(Tok, usize)],
    mut i: usize,
    here: &[String],
    report: &mut dyn FnMut(Ref),
) -> usize {
    while is(toks, i, Tok::Other('#')) && is(toks, i + 1, Tok::Open('[')) {
        i = past_group(toks, i + 1);
    }
    let start = i;
    let mut depth = 0usize;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Open(c) => {
                if *c == '{' && depth == 0 {
                    return past_group(toks, i);
                }
                depth += 1;
            }
            Tok::Close(_) => depth = depth.saturating_sub(1),
            Tok::Other(';') if depth == 0 => {
                let words: Vec<_> = (start..i).filter_map(|k| ident(toks, k)).collect();
                if let [.., "mod", name] = words.as_slice() {
                    let mut p = here.to_vec();
                    p.push((*name).to_owned());
                    report(Ref::TestOnlyModFile(p));
                }
                return i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// One shortest cycle through each module that lies on one, each listed once
/// (starting at its alphabetically first module).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    let next = |m: &str| -> Vec<String> {
        graph
            .edges
            .get(m)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut found = BTreeSet::new();
    for start in &graph.modules {
        // Breadth-first from `start` back to `start`.
        let mut parent: BTreeMap<String, String> = BTreeMap::new();
        let mut queue: VecDeque<String> = VecDeque::from([start.clone()]);
        let mut closing = None;
        'bfs: while let Some(m) = queue.pop_front() {
            for n in next(&m) {
                if &n == start {
                    closing = Some(m);
                    break 'bfs;
                }
                if !parent.contains_key(&n) {
                    parent.insert(n.clone(), m.clone());
                    queue.push_back(n);
                }
            }
        }
        let Some(mut m) = closing else { continue };
        let mut cycle = vec![m.clone()];
        while &m != start {
            m = parent[&m].clone();
            cycle.push(m.clone());
        }
        cycle.reverse();
        let first = (0..cycle.len()).min_by_key(|&k| &cycle[k]).unwrap();
        cycle.rotate_left(first);
        found.insert(cycle);
    }
    found.into_iter().collect()
}

fn describe(graph: &Graph, cycles: &[Vec<String>]) -> String {
    let mut out = String::new();
    for cycle in cycles {
        let mut path = cycle.clone();
        path.push(cycle[0].clone());
        out += &format!("  {}\n", path.join(" -> "));
        for pair in path.windows(2) {
            let site = &graph.edges[&pair[0]][&pair[1]];
            out += &format!("      {} -> {}: {site}\n", pair[0], pair[1]);
        }
    }
    out
}

fn graph_of(files: &[(&str, &str)]) -> Graph {
    let files: Vec<_> = files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), t.to_string()))
        .collect();
    module_graph(&files)
}

fn edge_list(graph: &Graph) -> Vec<String> {
    let mut out = Vec::new();
    for (from, tos) in &graph.edges {
        for to in tos.keys() {
            out.push(format!("{from}->{to}"));
        }
    }
    out
}

#[test]
fn the_layering_scan_finds_a_cycle_through_grouped_imports_and_paths_in_code() {
    let graph = graph_of(&[
        ("lib.rs", "pub mod a; pub mod b; pub mod c;"),
        ("a.rs", "use crate::{b::{X, Y}, c};\nfn f() {}"),
        ("b.rs", "fn f() {\n    let _ = crate::a::g();\n}"),
        ("c.rs", "pub fn h() {}"),
    ]);
    assert_eq!(edge_list(&graph), ["a->b", "a->c", "b->a"]);
    assert_eq!(cycles(&graph), [vec!["a".to_owned(), "b".to_owned()]]);
    let text = describe(&graph, &cycles(&graph));
    assert!(text.contains("a -> b -> a"), "{text}");
    assert!(text.contains("b -> a: src/b.rs:2"), "{text}");
    // A longer cycle is reported as one path.
    let graph = graph_of(&[
        ("a.rs", "use crate::b::X;"),
        ("b.rs", "use crate::c::X;"),
        ("c/mod.rs", "use crate::a::X;"),
    ]);
    assert_eq!(
        describe(&graph, &cycles(&graph)).lines().next(),
        Some("  a -> b -> c -> a")
    );
}

#[test]
fn the_layering_scan_ignores_comments_strings_and_test_code() {
    let graph = graph_of(&[
        ("a.rs", "pub fn g() {}"),
        (
            "b.rs",
            r####"//! See crate::a.
/* crate::a /* nested */ crate::a */
fn f() -> &'static str { let _c = '"'; let _l: &'static u8 = &b'x'; "crate::a \" crate::a" }
const R: &str = r#"crate::a " crate::a"#;
#[cfg(test)]
mod tests {
    use crate::a;
}
#[cfg(test)]
use crate::a::g;
#[cfg(test)]
mod more;
"####,
        ),
        ("b/more.rs", "use crate::a::g;"),
        ("c.rs", "#[cfg(not(test))]\nuse crate::a::g;"),
    ]);
    assert_eq!(edge_list(&graph), ["c->a"]);
}

#[test]
fn the_layering_scan_resolves_super_against_the_module_tree() {
    let graph = graph_of(&[
        ("a.rs", ""),
        ("b.rs", "mod inner { use super::super::a::X; }"),
        ("d/mod.rs", "mod e; use super::a::X; use super::{b, d};"),
        ("d/e.rs", "use super::Y; use super::super::c::Z;"),
        (
            "c.rs",
            "use super::super::a::X; // beyond the root: ignored",
        ),
    ]);
    assert_eq!(edge_list(&graph), ["b->a", "d->a", "d->b", "d->c"]);
}
