//! Every example manifest is something a user can apply as is: it parses into the Rust types,
//! passes `validate()`, and is admitted by the schema and CEL rules the API server enforces.

mod support;

use mantle_crds::read_manifest_dir;
use support::{admit, repo_root, yaml_documents};

#[test]
fn every_example_parses_and_validates() {
    let manifests = read_manifest_dir(&repo_root().join("examples")).expect("examples parse");
    let mut kinds: Vec<&str> = manifests.iter().map(|(_, m)| m.kind()).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        ["BatchJob", "Cell", "FoundationModel", "Guardrail", "KnowledgeBase", "ProvisionedThroughput"],
        "one example per kind at least"
    );
    for (path, manifest) in &manifests {
        if let Err(e) = manifest.validate() {
            panic!("{} {} in {}: {e}", manifest.kind(), manifest.name(), path.display());
        }
    }
}

#[test]
fn every_example_is_admitted_by_schema_and_cel() {
    for path in example_files() {
        for object in yaml_documents(&path) {
            if let Err(rejections) = admit(&object) {
                panic!("{} rejected: {rejections:#?}", path.display());
            }
        }
    }
}

#[test]
fn every_example_is_commented() {
    for path in example_files() {
        let text = std::fs::read_to_string(&path).expect("readable");
        assert!(text.starts_with("# "), "{} should open with a comment saying what it is for", path.display());
    }
}

/// The commented-out manifests of an example (blocks of `# `-prefixed YAML from `# apiVersion:` to
/// the first line that is not `# …`), uncommented: a `# # note` inside a block stays a comment.
fn commented_out_manifests(text: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        inside = match line.strip_prefix("# ") {
            Some(yaml) if inside || yaml.starts_with("apiVersion:") => {
                if !inside {
                    out.push_str("---\n");
                }
                out.push_str(yaml);
                out.push('\n');
                true
            }
            _ => false,
        };
    }
    out
}

/// The External engine example is commented out (it needs a running server), and still what a
/// user can apply once uncommented: an endpoint model and an image model, valid both ways.
#[test]
fn the_external_engine_example_is_valid_once_uncommented() {
    let path = repo_root().join("examples/external-engine.yaml");
    let text = std::fs::read_to_string(&path).expect("examples/external-engine.yaml");
    assert!(mantle_crds::parse_manifests(&text, "external-engine.yaml").expect("parses").is_empty(), "not loaded");
    let uncommented = commented_out_manifests(&text);
    let manifests = mantle_crds::parse_manifests(&uncommented, "external-engine.yaml").expect("uncommented parses");
    let mut kinds = Vec::new();
    for manifest in &manifests {
        manifest.validate().unwrap_or_else(|e| panic!("{}: {e}", manifest.name()));
        let mantle_crds::Manifest::FoundationModel(fm) = manifest else { panic!("{} is not a model", manifest.name()) };
        let external = fm.spec.engine.external.as_ref().expect("an External engine");
        kinds.push((external.endpoint.is_some(), external.image.is_some()));
    }
    assert_eq!(kinds, [(true, false), (false, true)], "an endpoint model, then an image model");
    let dir = std::env::temp_dir().join(format!("mantle-external-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("external-engine.yaml");
    std::fs::write(&file, &uncommented).expect("written");
    for object in yaml_documents(&file) {
        if let Err(rejections) = admit(&object) {
            panic!("the uncommented external engine example is rejected: {rejections:#?}");
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn sample_batch_input_is_bedrock_record_format() {
    let text = std::fs::read_to_string(repo_root().join("examples/batch-input.jsonl")).expect("sample input");
    let mut ids = std::collections::HashSet::new();
    for line in text.lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("each line is one JSON object");
        let id = record["recordId"].as_str().expect("recordId is a string");
        assert!(ids.insert(id.to_string()), "recordId {id} repeats");
        assert!(record["modelInput"].is_object(), "modelInput is an object");
    }
    assert!(ids.len() >= 3);
}

fn example_files() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("examples"))
        .expect("examples dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// kind-config.yaml gives each example Cell a worker node its selector matches.
#[test]
fn kind_config_has_a_worker_for_every_example_cell() {
    let kind = yaml_documents(&repo_root().join("kind-config.yaml")).pop().expect("kind config");
    let nodes = kind["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.iter().filter(|n| n["role"] == "control-plane").count(), 1);
    let workers: Vec<&serde_json::Value> = nodes.iter().filter(|n| n["role"] == "worker").collect();
    let cells: Vec<_> = read_manifest_dir(&repo_root().join("examples"))
        .expect("examples parse")
        .into_iter()
        .filter_map(|(_, m)| match m {
            mantle_crds::Manifest::Cell(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(cells.len(), 2, "two example Cells");
    for cell in cells {
        let matching = workers
            .iter()
            .filter(|w| cell.spec.node_selector.iter().all(|(k, v)| w["labels"][k].as_str() == Some(v.as_str())))
            .count();
        assert_eq!(matching, 1, "Cell {:?} selects exactly one kind worker", cell.metadata.name);
    }
}
