//! `mantle validate`, `mantle render` and `mantle crdgen --check` as a user runs them: exit codes
//! and output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()))
        .parent()
        .expect("cli/ sits in the repository")
        .to_path_buf()
}

fn mantle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mantle")).args(args).current_dir(repo_root()).output().expect("mantle runs")
}

#[test]
fn validate_accepts_the_examples_by_default() {
    let out = mantle(&["validate"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("ok      FoundationModel smollm2-135m-instruct"), "{stdout}");
    assert!(stdout.contains("all valid"), "{stdout}");
}

#[test]
fn validate_names_the_broken_field_and_fails() {
    let out = mantle(&["validate", "examples", "tests/invalid/fm-min-replicas-over-max.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("INVALID FoundationModel fm-min-replicas-over-max"), "{stdout}");
    assert!(stdout.contains("spec.replicas.min: replicas.min must not exceed replicas.max"), "{stdout}");
}

#[test]
fn validate_reports_unparseable_manifests_with_the_field() {
    let out = mantle(&["validate", "tests/invalid/bj-unknown-tier.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("spec.tier: unknown variant `GOLD`"), "{stdout}");
}

#[test]
fn validate_fails_on_a_missing_path() {
    let out = mantle(&["validate", "no-such-dir"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no-such-dir"));
}

#[test]
fn crdgen_check_passes_on_the_checked_in_manifests() {
    let out = mantle(&["crdgen", "--check"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn render_prints_what_the_operator_would_create_and_fails_on_what_it_cannot_plan() {
    let out = mantle(&["render"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("---\napiVersion: apps/v1\nkind: Deployment\n"), "{stdout}");
    assert!(stdout.contains("name: smollm2-135m-instruct-cell-b-analytics-smollm2"), "{stdout}");
    // Without the Cells, the models name Cells that do not exist: said on stderr, exit 1.
    let out = mantle(&["render", "examples/foundationmodel-smollm2.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FoundationModel smollm2-135m-instruct: CellNotFound — no Cell named cell-a, cell-b"),
        "{stderr}"
    );
    // An invalid manifest is refused, naming it.
    let out = mantle(&["render", "tests/invalid/fm-min-replicas-over-max.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("replicas.min must not exceed replicas.max"));
}
