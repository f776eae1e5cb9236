//! The `mantle.dev/v1alpha1` API: the six custom resources platform teams apply, their schemas and
//! CEL rules (what the API server enforces), and `validate()` (the same invariants, checked in Rust
//! by the operator before it acts and by `mantle validate` before anything reaches a cluster).

// `#[kube(printcolumn(...))]` repeats `type_ = "string"`; clippy mistakes that for a duplicate.
#![allow(clippy::duplicated_attributes)]

mod batch_job;
mod cell;
mod common;
mod foundation_model;
mod generate;
mod guardrail;
mod knowledge_base;
mod manifest;
mod provisioned_throughput;
mod validation;

pub use batch_job::*;
pub use cell::*;
pub use common::*;
pub use foundation_model::*;
pub use generate::{GeneratedCrd, all_crds, check_generated, write_generated};
pub use guardrail::*;
pub use knowledge_base::*;
pub use manifest::{Manifest, ManifestError, manifest_files, parse_manifests, read_manifest_dir};
pub use provisioned_throughput::*;
pub use validation::{FieldError, Invalid, Validate};

/// The API group every Mantle resource belongs to.
pub const GROUP: &str = "mantle.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
