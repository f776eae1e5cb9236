//! Rust-side validation: each spec's cross-field invariants, mirrored one-for-one from the CEL rules
//! in its schema, plus the ranges and patterns the operator relies on. Errors name the field by its
//! path in the manifest (`spec.replicas.min`), the way the API server does.

use std::collections::HashMap;
use std::fmt;
use std::sync::{LazyLock, Mutex};

/// One violated rule: the field's path in the manifest and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every rule a spec violates, reported together so a user fixes a manifest in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Invalid(pub Vec<FieldError>);

impl Invalid {
    /// Whether any violation is reported for `field` (an exact path or a path below it).
    pub fn names(&self, field: &str) -> bool {
        self.0.iter().any(|e| {
            e.field == field || e.field.starts_with(&format!("{field}.")) || e.field.starts_with(&format!("{field}["))
        })
    }
}

/// A spec that can check its own invariants. `validate` sees the spec alone; paths are reported
/// from the manifest root (`spec.…`).
pub trait Validate {
    fn validate(&self) -> Result<(), Invalid>;
}

/// The schema's patterns, each compiled once per process: the operator validates every spec of a
/// namespace on each reconcile, and compiling a regex costs far more than matching it. The keys are
/// the crate's own `'static` patterns, so the cache is bounded by the source, not by input — which
/// is why each compiled regex may live for the process (a clone would rebuild its search cache).
fn compiled(pattern: &'static str) -> Option<&'static regex::Regex> {
    static CACHE: LazyLock<Mutex<HashMap<&'static str, Option<&'static regex::Regex>>>> =
        LazyLock::new(Default::default);
    let mut cache = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    *cache.entry(pattern).or_insert_with(|| regex::Regex::new(pattern).ok().map(|re| &*Box::leak(Box::new(re))))
}

/// Collects violations while a spec is walked.
#[derive(Default)]
pub(crate) struct Violations(Vec<FieldError>);

impl Violations {
    /// Records `message` against `field` unless `ok` holds.
    pub(crate) fn check(&mut self, ok: bool, field: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.0.push(FieldError { field: field.into(), message: message.into() });
        }
    }

    /// Checks that `value` matches the anchored `pattern` (one of the schema's patterns).
    pub(crate) fn pattern(&mut self, value: &str, pattern: &'static str, field: impl Into<String>) {
        if !compiled(pattern).is_some_and(|re| re.is_match(value)) {
            self.check(false, field, format!("{value:?} does not match {pattern}"));
        }
    }

    /// Checks `min <= value <= max`.
    pub(crate) fn range<T: PartialOrd + fmt::Display>(&mut self, value: T, min: T, max: T, field: impl Into<String>) {
        if !(value >= min && value <= max) {
            self.check(false, field, format!("{value} is outside {min}..={max}"));
        }
    }

    pub(crate) fn finish(self) -> Result<(), Invalid> {
        if self.0.is_empty() { Ok(()) } else { Err(Invalid(self.0)) }
    }
}
