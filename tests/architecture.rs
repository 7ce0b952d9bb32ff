//! The module layering, checked: each top-level module may use only modules
//! of a lower layer, so no import cycle can form (the one the architecture
//! review found ran between the access log and the forward path).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly"
)]

use std::collections::BTreeMap;
use std::path::Path;

/// Lowest first. A module may use modules of a strictly lower layer.
const LAYERS: &[(&str, u32)] = &[
    ("stream", 0),
    ("headers", 0),
    ("mock", 0),
    ("error", 1),
    ("store", 1),
    ("wire", 2),
    ("config", 2),
    ("telemetry", 2),
    ("catch_panic", 2),
    ("ingress", 2),
    ("limits", 2),
    ("auth", 3),
    ("upstream", 3),
    ("usage", 4),
    ("routing", 4),
    ("admin", 5),
    ("state", 6),
    ("pipeline", 7),
    ("server", 7),
    ("admin_http", 7),
];

/// Uses that cross a layer upwards on purpose, with the reason.
const EXCEPTIONS: &[(&str, &str, &str)] = &[(
    "config",
    "upstream::BaseUrl",
    "the loader parses base URLs with the request path's own type (a leaf file)",
)];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// Every `crate::MODULE::rest` path in `text`.
fn crate_paths(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let tail = &rest[at + "crate::".len()..];
        let end = tail
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        found.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    found
}

fn module_of(file: &Path, src: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_only_use_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut violations = Vec::new();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for file in all {
        let module = module_of(&file, &src);
        if module == "lib" || module == "main" {
            continue; // the crate root assembles everything
        }
        let own =
            layer(&module).unwrap_or_else(|| panic!("module `{module}` has no layer in LAYERS"));
        seen.insert(module.clone(), own);
        let text = std::fs::read_to_string(&file).unwrap();
        for path in crate_paths(&text) {
            let target = path.split("::").next().unwrap_or_default().to_owned();
            if target == module || target.is_empty() {
                continue;
            }
            let Some(theirs) = layer(&target) else {
                violations.push(format!(
                    "{}: uses `crate::{path}`, a module with no layer",
                    file.display()
                ));
                continue;
            };
            let excepted = EXCEPTIONS
                .iter()
                .any(|(from, to, _)| *from == module && path.starts_with(to));
            if theirs >= own && !excepted {
                violations.push(format!(
                    "{}: `{module}` (layer {own}) uses `crate::{path}` (layer {theirs})",
                    file.display()
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering broken:\n{}",
        violations.join("\n")
    );
    assert!(seen.len() >= 10, "only {seen:?}");
}
