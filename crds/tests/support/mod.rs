//! Test support: an emulation of what the Kubernetes API server does with a Mantle manifest on
//! create, since no API server runs on the test machines — validate it against the CRD's
//! `openAPIV3Schema` (a JSON Schema validator), then evaluate the `x-kubernetes-validations` CEL
//! rules (kube's CEL interpreter, defaults applied first as the API server does).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kube::core::cel::{RootContext, Validator};
use mantle_crds::{GROUP, VERSION, all_crds};
use serde::Deserialize;
use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    // Read at run time: cargo reuses a test binary built in another checkout that shares the
    // target directory, and the compile-time path would point there.
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()))
        .parent()
        .expect("crate sits in the repository")
        .to_path_buf()
}

/// Every YAML document of a file, as JSON values.
pub fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// Why the emulated API server refused an object.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// `schema` or `cel`.
    pub by: &'static str,
    /// Dotted path of the offending field (`spec.replicas.min`, `spec.filters[0].type`).
    pub field: String,
    pub message: String,
}

/// Admits `object` (a whole manifest) the way the API server would on create, or says why not.
pub fn admit(object: &Value) -> Result<(), Vec<Rejection>> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    assert_eq!(api_version, format!("{GROUP}/{VERSION}"), "not a Mantle object");
    let crd = all_crds()
        .into_iter()
        .find(|g| g.crd.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"))
        .crd;
    let schema = serde_json::to_value(
        crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("schema"),
    )
    .expect("schema serializes");

    let validator = jsonschema::validator_for(&schema).expect("openAPIV3Schema is a valid JSON Schema");
    let mut rejections: Vec<Rejection> = validator
        .iter_errors(object)
        .map(|e| Rejection { by: "schema", field: dotted(e.instance_path().as_str()), message: e.to_string() })
        .collect();

    let root =
        RootContext { api_version: api_version.to_string(), api_group: GROUP.to_string(), kind: kind.to_string() };
    if let Err(errors) = Validator::new().validate_with_context(&schema, object, None, Some(&root)) {
        rejections.extend(errors.into_vec().into_iter().map(|e| Rejection {
            by: "cel",
            field: e.field_path.trim_start_matches('.').to_string(),
            message: format!("{} ({:?}, rule `{}`)", e.message, e.kind, e.rule),
        }));
    }
    if rejections.is_empty() { Ok(()) } else { Err(rejections) }
}

/// `/spec/filters/0/type` → `spec.filters[0].type`.
fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').filter(|s| !s.is_empty()) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if segment.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    out
}

/// Whether `field` is `expected` or lies beneath it.
pub fn names_field(field: &str, expected: &str) -> bool {
    field == expected || field.starts_with(&format!("{expected}.")) || field.starts_with(&format!("{expected}["))
}
