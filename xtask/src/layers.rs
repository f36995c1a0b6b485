//! `cargo xtask layers`: every workspace crate depends only on the crates
//! below it (docs/ARCHITECTURE.md draws the same picture).
//!
//! The allowed edges are listed here, one line per crate, and compared with
//! what `cargo metadata` reports for normal and build dependencies. Dev
//! dependencies may reach up (a test may build its fixtures with a higher
//! crate); a library may not. An edge that is not in the table fails, and so
//! does a workspace crate the table does not know, so a new crate has to
//! say where it sits.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use crate::util::cargo;

/// Each workspace crate and the workspace crates its library may import.
const ALLOWED: &[(&str, &[&str])] = &[
    ("cots-ops", &[]),
    ("cots-text", &[]),
    ("cots-encoders", &["cots-ops", "cots-text"]),
    ("cots-objectives", &["cots-ops"]),
    ("cots-data", &["cots-text"]),
    ("cots-eval", &[]),
    ("cots-index", &[]),
    ("cots-infer", &["cots-data"]),
    (
        "cots-train",
        &[
            "cots-ops",
            "cots-text",
            "cots-encoders",
            "cots-objectives",
            "cots-data",
            "cots-eval",
            "cots-infer",
        ],
    ),
    ("cots-serve", &["cots-data", "cots-index", "cots-infer"]),
    ("cots-datasets", &["cots-data", "cots-train"]),
    (
        "cots",
        &[
            "cots-ops",
            "cots-text",
            "cots-encoders",
            "cots-objectives",
            "cots-data",
            "cots-eval",
            "cots-train",
            "cots-index",
            "cots-infer",
            "cots-serve",
            "cots-datasets",
        ],
    ),
    ("cots-benches", &["*"]),
    ("xtask", &[]),
];

pub fn run(_args: &[String]) -> Result<()> {
    let out = cargo(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("could not run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata printed no JSON")?;
    let edges = library_edges(&meta)?;
    let wrong = check(&edges);
    if !wrong.is_empty() {
        bail!(
            "crates depend outside their layer (xtask/src/layers.rs lists the allowed edges):\n  {}",
            wrong.join("\n  ")
        );
    }
    eprintln!(
        "layers: {} crates, every library edge points down",
        edges.len()
    );
    Ok(())
}

/// Workspace crate -> the workspace crates among its normal and build
/// dependencies.
fn library_edges(meta: &serde_json::Value) -> Result<BTreeMap<String, Vec<String>>> {
    let packages = meta["packages"]
        .as_array()
        .context("cargo metadata: no packages")?;
    let names: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut edges = BTreeMap::new();
    for p in packages {
        let name = p["name"].as_str().context("a package without a name")?;
        let deps = p["dependencies"]
            .as_array()
            .map(|d| d.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|d| d["kind"].as_str() != Some("dev"))
            .filter_map(|d| d["name"].as_str())
            .filter(|d| names.contains(d))
            .map(str::to_string)
            .collect();
        edges.insert(name.to_string(), deps);
    }
    Ok(edges)
}

/// One line per edge (or crate) that the table does not allow.
fn check(edges: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut wrong = Vec::new();
    for (krate, deps) in edges {
        let Some((_, allowed)) = ALLOWED.iter().find(|(k, _)| k == krate) else {
            wrong.push(format!("{krate}: not in the table; add it at its layer"));
            continue;
        };
        for d in deps {
            if !allowed.contains(&"*") && !allowed.contains(&d.as_str()) {
                wrong.push(format!("{krate} -> {d}"));
            }
        }
    }
    wrong
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edges(list: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        list.iter()
            .map(|(k, d)| (k.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn an_upward_or_sideways_edge_and_an_unknown_crate_are_reported() {
        assert!(check(&edges(&[("cots-data", &["cots-text"])])).is_empty());
        assert_eq!(
            check(&edges(&[("cots-data", &["cots-encoders"])])),
            ["cots-data -> cots-encoders"]
        );
        assert_eq!(
            check(&edges(&[("cots-serve", &["cots-train"])])),
            ["cots-serve -> cots-train"]
        );
        assert_eq!(check(&edges(&[("cots-new", &[])])).len(), 1);
    }

    #[test]
    fn dev_dependencies_do_not_count() {
        let meta = serde_json::json!({"packages": [
            {"name": "cots-serve", "dependencies": [
                {"name": "cots-train", "kind": "dev"},
                {"name": "cots-index", "kind": null},
                {"name": "serde", "kind": null}
            ]},
            {"name": "cots-train", "dependencies": []},
            {"name": "cots-index", "dependencies": []}
        ]});
        let e = library_edges(&meta).unwrap();
        assert_eq!(e["cots-serve"], ["cots-index"]);
    }
}
