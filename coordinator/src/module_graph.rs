//! The coordinator's top-level modules must not import each other in a circle: each
//! reads as a layer over the ones it uses (`engine` under `scheduler` under `server`...).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `crate` and `::` apart, so that this file's own text is not read as an edge.
const CRATE_PATH: &str = concat!("crate", "::");

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`engine/pipeline.rs` is in `engine`); `None`
/// for the crate root.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
    (name != "main").then_some(name)
}

/// The first path segment of every `crate::` path in `code`, including each one of a
/// `crate::{a::X, b}` group. Comments are skipped.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(at) = rest.find(CRATE_PATH) {
            rest = &rest[at + CRATE_PATH.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Only the group's top level names modules: `{a::{X, Y}, b}` -> a, b.
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => out.push(std::mem::take(&mut item)),
                        _ if depth == 0 => item.push(c),
                        _ => {}
                    }
                }
                out.push(item);
            } else {
                out.push(rest.to_owned());
            }
        }
    }
    out.iter()
        .map(|p| p.trim().split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("").to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Every edge `from -> to` between distinct top-level modules.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in &files {
        let Some(from) = top_module(&src, file) else { continue };
        let code = std::fs::read_to_string(file).unwrap();
        for to in crate_paths(&code) {
            if to != from && modules.contains(&to) {
                graph.get_mut(&from).unwrap().insert(to);
            }
        }
    }
    graph
}

/// The strongly connected components of more than one module (Tarjan's algorithm), and
/// the modules that import themselves through others.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, v: &'g str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            for w in &self.graph[v] {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(&w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    component.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk { graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), found: Vec::new() };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn crate_paths_are_read_from_uses_and_groups() {
    let code = [
        "use krate::engine::{self, Engine};",
        "use krate::{cli::X, scheduler::{A, B}, server};",
        "let x = krate::discovery::f(); // krate::plan is a comment",
    ]
    .join("\n")
    .replace("krate::", CRATE_PATH);
    assert_eq!(crate_paths(&code), ["engine", "cli", "scheduler", "server", "discovery"]);
}

#[test]
fn cycles_are_found() {
    let g = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert!(cycles(&g(&[("a", "b"), ("b", "c"), ("a", "c")])).is_empty());
    assert_eq!(cycles(&g(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])), [["a", "b", "c"]]);
}

#[test]
fn no_module_imports_itself_through_others() {
    let graph = module_graph();
    assert!(graph.contains_key("engine") && graph["scheduler"].contains("engine"), "the graph was not read: {graph:?}");
    let found = cycles(&graph);
    let edges: Vec<String> =
        graph.iter().flat_map(|(from, tos)| tos.iter().map(move |to| format!("{from} -> {to}"))).collect();
    assert!(found.is_empty(), "modules that import each other in a circle: {found:?}\nedges:\n{}", edges.join("\n"));
    eprintln!("module edges:\n{}", edges.join("\n"));
}
