//! Reading Mantle manifests from YAML (one or many documents per file, a directory of files) into
//! typed resources, with errors that name the file, the document and the field.

use std::path::{Path, PathBuf};

use kube::core::ResourceExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::validation::{Invalid, Validate};
use crate::{BatchJob, Cell, FoundationModel, GROUP, Guardrail, KnowledgeBase, ProvisionedThroughput, VERSION};

/// One Mantle resource read from a manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    FoundationModel(FoundationModel),
    ProvisionedThroughput(ProvisionedThroughput),
    Guardrail(Guardrail),
    KnowledgeBase(KnowledgeBase),
    BatchJob(BatchJob),
    Cell(Cell),
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
}

impl Manifest {
    pub fn kind(&self) -> &'static str {
        match self {
            Manifest::FoundationModel(_) => "FoundationModel",
            Manifest::ProvisionedThroughput(_) => "ProvisionedThroughput",
            Manifest::Guardrail(_) => "Guardrail",
            Manifest::KnowledgeBase(_) => "KnowledgeBase",
            Manifest::BatchJob(_) => "BatchJob",
            Manifest::Cell(_) => "Cell",
        }
    }

    pub fn name(&self) -> String {
        match self {
            Manifest::FoundationModel(r) => r.name_any(),
            Manifest::ProvisionedThroughput(r) => r.name_any(),
            Manifest::Guardrail(r) => r.name_any(),
            Manifest::KnowledgeBase(r) => r.name_any(),
            Manifest::BatchJob(r) => r.name_any(),
            Manifest::Cell(r) => r.name_any(),
        }
    }

    /// The resource's invariants, as the operator checks them before acting.
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            Manifest::FoundationModel(r) => r.spec.validate(),
            Manifest::ProvisionedThroughput(r) => r.spec.validate(),
            Manifest::Guardrail(r) => r.spec.validate(),
            Manifest::KnowledgeBase(r) => r.spec.validate(),
            Manifest::BatchJob(r) => r.validate(),
            Manifest::Cell(r) => r.spec.validate(),
        }
    }
}

/// Parses every `mantle.dev` document in `text`; documents of other API groups (a Secret next to
/// the models, say) are skipped. `origin` names the text in errors (usually its file path).
pub fn parse_manifests(text: &str, origin: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut manifests = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let at = format!("{origin} (document {})", index + 1);
        let value = serde_json::Value::deserialize(document)
            .map_err(|e| ManifestError::Parse { origin: at.clone(), message: format!("not valid YAML: {e}") })?;
        if value.is_null() {
            continue;
        }
        if let Some(manifest) = parse_document(value, &at)? {
            manifests.push(manifest);
        }
    }
    Ok(manifests)
}

fn parse_document(value: serde_json::Value, at: &str) -> Result<Option<Manifest>, ManifestError> {
    let fail = |message: String| ManifestError::Parse { origin: at.to_string(), message };
    let api_version = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default();
    let Some((group, version)) = api_version.split_once('/') else {
        return Ok(None);
    };
    if group != GROUP {
        return Ok(None);
    }
    if version != VERSION {
        return Err(fail(format!("apiVersion {api_version} is not served; use {GROUP}/{VERSION}")));
    }
    let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let manifest = match kind.as_str() {
        "FoundationModel" => Manifest::FoundationModel(typed(value).map_err(fail)?),
        "ProvisionedThroughput" => Manifest::ProvisionedThroughput(typed(value).map_err(fail)?),
        "Guardrail" => Manifest::Guardrail(typed(value).map_err(fail)?),
        "KnowledgeBase" => Manifest::KnowledgeBase(typed(value).map_err(fail)?),
        "BatchJob" => Manifest::BatchJob(typed(value).map_err(fail)?),
        "Cell" => Manifest::Cell(typed(value).map_err(fail)?),
        other => return Err(fail(format!("unknown kind {other:?} in {GROUP}"))),
    };
    Ok(Some(manifest))
}

/// Deserializes with the failing field's path in the message (`spec.tier: unknown variant …`).
fn typed<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." { e.inner().to_string() } else { format!("{path}: {}", e.inner()) }
    })
}

/// Reads every `*.yaml` / `*.yml` file in `dir` (not recursive), in name order.
pub fn read_manifest_dir(dir: &Path) -> Result<Vec<(PathBuf, Manifest)>, ManifestError> {
    let paths = manifest_files(dir).map_err(|source| io_error(dir, source))?;
    let mut manifests = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|source| io_error(&path, source))?;
        for manifest in parse_manifests(&text, &path.display().to_string())? {
            manifests.push((path.clone(), manifest));
        }
    }
    Ok(manifests)
}

/// The `*.yaml` and `*.yml` files of a directory, sorted.
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    paths.sort();
    Ok(paths)
}

fn io_error(path: &Path, source: std::io::Error) -> ManifestError {
    ManifestError::Io { path: path.to_path_buf(), source }
}
