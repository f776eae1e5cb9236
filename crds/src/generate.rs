//! The CRD manifests, generated from the types. `crdgen` writes them; a test fails when the
//! checked-in copies differ, so nobody edits the YAML by hand.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{BatchJob, Cell, FoundationModel, Guardrail, KnowledgeBase, ProvisionedThroughput};

/// Where the generated files live, relative to the repository root: the plain manifests and the
/// chart's CRD directory (Helm installs those before the templates).
pub const OUTPUT_DIRS: [&str; 2] = ["crds/manifests", "charts/mantle/crds"];

const HEADER: &str = "# Generated from crds/src by `cargo run -p mantle-crds --bin crdgen`. Do not edit by hand.\n";

/// One CRD, rendered.
pub struct GeneratedCrd {
    /// `<plural>.mantle.dev.yaml`
    pub file_name: String,
    pub crd: CustomResourceDefinition,
    pub yaml: String,
}

/// Every Mantle CRD, in a stable order.
pub fn all_crds() -> Vec<GeneratedCrd> {
    [
        FoundationModel::crd(),
        ProvisionedThroughput::crd(),
        Guardrail::crd(),
        KnowledgeBase::crd(),
        BatchJob::crd(),
        Cell::crd(),
    ]
    .into_iter()
    .map(|crd| {
        let name = crd.metadata.name.clone().unwrap_or_default();
        // A derived CRD always serializes; failing here is a bug in the types, caught by tests.
        let body = serde_norway::to_string(&crd).expect("CRD serializes to YAML");
        GeneratedCrd { file_name: format!("{name}.yaml"), crd, yaml: format!("{HEADER}{body}") }
    })
    .collect()
}

/// Writes every CRD into each output directory under `root`, returning the paths written.
pub fn write_generated(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for dir in OUTPUT_DIRS {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir)?;
        for generated in all_crds() {
            let path = dir.join(&generated.file_name);
            std::fs::write(&path, &generated.yaml)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The files under `root` that are missing or differ from what the types generate.
pub fn check_generated(root: &Path) -> Vec<PathBuf> {
    let mut stale = Vec::new();
    for dir in OUTPUT_DIRS {
        for generated in all_crds() {
            let path = root.join(dir).join(&generated.file_name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(generated.yaml.as_str()) {
                stale.push(path);
            }
        }
    }
    stale
}
