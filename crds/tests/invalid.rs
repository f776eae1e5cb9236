//! Invalid manifests (`tests/invalid/`, one per rule) are refused for the right reason twice: by
//! the Rust side (`parse_manifests` + `validate()`, what the operator and `mantle validate` run)
//! and by the emulated API server (generated schema + CEL rules). Each file's first line says
//! which field must be named: `# rejects <field>: <why>`.

mod support;

use std::path::PathBuf;

use mantle_crds::parse_manifests;
use support::{admit, names_field, repo_root, yaml_documents};

fn invalid_dir() -> PathBuf {
    repo_root().join("tests/invalid")
}

/// Checks one invalid manifest against both validators.
fn assert_rejected(file: &str) {
    let path = invalid_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    let header =
        text.lines().next().and_then(|l| l.strip_prefix("# rejects ")).expect("`# rejects <field>: <why>` header");
    let (field, why) = header.split_once(": ").expect("header names a field and a reason");

    // The Rust side: a parse error or a validate() error that names the field.
    match parse_manifests(&text, file) {
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains(&format!("{field}:")), "{file}: parse error should name {field}: {message}");
        }
        Ok(manifests) => {
            assert_eq!(manifests.len(), 1, "{file}: one manifest");
            match manifests[0].validate() {
                Ok(()) => panic!("{file}: validate() accepted a manifest that breaks \"{why}\""),
                Err(invalid) => {
                    assert!(invalid.names(field), "{file}: validate() should name {field}, said: {invalid}")
                }
            }
        }
    }

    // The API server side: schema or CEL rejects it, naming the field.
    let object = yaml_documents(&path).pop().expect("one document");
    match admit(&object) {
        Ok(()) => panic!("{file}: the schema and CEL rules admitted a manifest that breaks \"{why}\""),
        Err(rejections) => assert!(
            rejections.iter().any(|r| names_field(&r.field, field)),
            "{file}: the API server should name {field}: {rejections:#?}"
        ),
    }
}

macro_rules! invalid_manifests {
    ($($test:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $test() {
                assert_rejected($file);
            }
        )*

        /// Every file in tests/invalid has its own named test above.
        #[test]
        fn every_invalid_manifest_has_a_test() {
            let listed = [$($file),*];
            for entry in std::fs::read_dir(invalid_dir()).expect("tests/invalid") {
                let name = entry.expect("entry").file_name().to_string_lossy().to_string();
                assert!(listed.contains(&name.as_str()), "tests/invalid/{name} has no test in invalid.rs");
            }
        }
    };
}

invalid_manifests! {
    bj_output_inside_input => "bj-output-inside-input.yaml",
    bj_reuses_itself => "bj-reuses-itself.yaml",
    bj_timeout_above_168h => "bj-timeout-above-168h.yaml",
    bj_timeout_below_24h => "bj-timeout-below-24h.yaml",
    bj_unknown_invocation_type => "bj-unknown-invocation-type.yaml",
    bj_unknown_tier => "bj-unknown-tier.yaml",
    cell_shuffle_shard_over_gpus => "cell-shuffle-shard-over-gpus.yaml",
    cell_unknown_state => "cell-unknown-state.yaml",
    cell_without_node_selector => "cell-without-node-selector.yaml",
    fm_context_length_too_small => "fm-context-length-too-small.yaml",
    fm_embedding_with_draft_model => "fm-embedding-with-draft-model.yaml",
    fm_embedding_with_text_body => "fm-embedding-with-text-body.yaml",
    fm_external_endpoint_scheme => "fm-external-endpoint-scheme.yaml",
    fm_external_endpoint_with_args => "fm-external-endpoint-with-args.yaml",
    fm_external_engine_with_image_and_endpoint => "fm-external-engine-with-image-and-endpoint.yaml",
    fm_external_engine_without_image_or_endpoint => "fm-external-engine-without-image-or-endpoint.yaml",
    fm_external_type_without_external => "fm-external-type-without-external.yaml",
    fm_legacy_without_end_of_life => "fm-legacy-without-end-of-life.yaml",
    fm_min_replicas_over_max => "fm-min-replicas-over-max.yaml",
    fm_model_id_pattern => "fm-model-id-pattern.yaml",
    fm_own_draft_model => "fm-own-draft-model.yaml",
    fm_own_fallback => "fm-own-fallback.yaml",
    fm_pin_without_host_memory_tier => "fm-pin-without-host-memory-tier.yaml",
    fm_prewarm_without_node_disk_tier => "fm-prewarm-without-node-disk-tier.yaml",
    fm_source_uri_scheme => "fm-source-uri-scheme.yaml",
    fm_without_source => "fm-without-source.yaml",
    fm_external_endpoint_with_prewarm => "fm-external-endpoint-with-prewarm.yaml",
    gr_empty_word_policy => "gr-empty-word-policy.yaml",
    gr_grounding_threshold_above_range => "gr-grounding-threshold-above-range.yaml",
    gr_invalid_regex => "gr-invalid-regex.yaml",
    gr_prompt_attack_on_output => "gr-prompt-attack-on-output.yaml",
    gr_without_policy => "gr-without-policy.yaml",
    kb_child_chunk_over_parent => "kb-child-chunk-over-parent.yaml",
    kb_overlap_not_below_chunk_size => "kb-overlap-not-below-chunk-size.yaml",
    kb_pgvector_without_settings => "kb-pgvector-without-settings.yaml",
    kb_strategy_without_its_settings => "kb-strategy-without-its-settings.yaml",
    kb_unknown_deduplication => "kb-unknown-deduplication.yaml",
    pt_negative_model_units => "pt-negative-model-units.yaml",
    pt_unknown_commitment => "pt-unknown-commitment.yaml",
    pt_zero_model_units => "pt-zero-model-units.yaml",
}
