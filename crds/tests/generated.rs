//! The checked-in CRD YAML is exactly what the types generate, and carries the CEL rules.

mod support;

use mantle_crds::{all_crds, check_generated};
use support::repo_root;

#[test]
fn checked_in_crds_match_the_types() {
    let stale = check_generated(&repo_root());
    assert!(
        stale.is_empty(),
        "generated CRD YAML is stale; run `cargo run -p mantle-crds --bin crdgen` and commit:\n{stale:#?}"
    );
}

/// Every cross-field invariant `validate()` checks has its CEL twin in the generated schema.
#[test]
fn each_cel_rule_is_in_the_generated_yaml() {
    let expected: &[(&str, &[&str])] = &[
        (
            "foundationmodels.mantle.dev",
            &[
                "self.modality == 'TEXT' || !has(self.draftModel)",
                "self.modality == 'TEXT' || !has(self.chatTemplate)",
                "!has(self.invokeModelBody) || (self.modality == 'TEXT') == (self.invokeModelBody in ['AnthropicMessages', 'Llama', 'Mistral'])",
                "!has(self.draftModel) || self.draftModel.modelId != self.modelId",
                "self.type == 'External' ? has(self.external) : !has(self.external)",
                "has(self.image) != has(self.endpoint)",
                "!has(self.endpoint) || !has(self.args) || size(self.args) == 0",
                "has(self.source) || (has(self.engine) && has(self.engine.external) && has(self.engine.external.endpoint))",
                "!(has(self.engine) && has(self.engine.external) && has(self.engine.external.endpoint)) || !has(self.weightCache) || !has(self.weightCache.prewarm)",
                "self.min <= self.max",
                "!self.pinInHostMemory || 'HostMemory' in self.tiers",
                "!has(self.prewarm) || 'NodeDisk' in self.tiers",
                "self.status == 'ACTIVE' || has(self.endOfLife)",
                "self == oldSelf",
            ],
        ),
        ("provisionedthroughputs.mantle.dev", &["self == oldSelf"]),
        (
            "guardrails.mantle.dev",
            &[
                "has(self.contentPolicy) || has(self.topicPolicy) || has(self.wordPolicy) || has(self.sensitiveInformationPolicy) || has(self.contextualGroundingPolicy)",
                "self.type != 'PROMPT_ATTACK' || self.outputStrength == 'NONE'",
                "size(self.words) > 0 || size(self.managedWordLists) > 0",
                "size(self.piiEntities) > 0 || size(self.regexes) > 0",
                "''.matches(self) == ''.matches(self)",
            ],
        ),
        (
            "knowledgebases.mantle.dev",
            &[
                "(self.strategy == 'FIXED_SIZE') == has(self.fixedSize)",
                "(self.strategy == 'HIERARCHICAL') == has(self.hierarchical)",
                "(self.strategy == 'SEMANTIC') == has(self.semantic)",
                "self.overlapTokens < self.maxTokens",
                "self.childMaxTokens < self.parentMaxTokens",
                "self.overlapTokens < self.childMaxTokens",
                "(self.type == 'Pgvector') == has(self.pgvector)",
                "(self.type == 'OpenSearch') == has(self.openSearch)",
                "self == oldSelf",
            ],
        ),
        (
            "batchjobs.mantle.dev",
            &[
                "!has(self.spec.reuseFrom) || self.spec.reuseFrom.jobName != self.metadata.name",
                "!self.output.uri.startsWith(self.input.uri) && !self.input.uri.startsWith(self.output.uri)",
                "self == oldSelf",
            ],
        ),
        (
            "cells.mantle.dev",
            &["size(self) > 0", "self.shuffleShardSize <= self.capacity.gpus || self.capacity.gpus == 0"],
        ),
    ];
    let crds = all_crds();
    for (name, rules) in expected {
        let generated = crds.iter().find(|g| g.crd.metadata.name.as_deref() == Some(name)).expect("CRD generated");
        let json = serde_json::to_value(&generated.crd).expect("serializes");
        let mut found = Vec::new();
        collect_rules(&json, &mut found);
        for rule in *rules {
            assert!(found.iter().any(|r| r == rule), "{name} lacks the CEL rule `{rule}`; it has {found:#?}");
        }
    }
}

#[test]
fn every_crd_is_namespaced_with_status_short_names_and_printer_columns() {
    let crds = all_crds();
    assert_eq!(crds.len(), 6);
    for g in crds {
        let spec = &g.crd.spec;
        assert_eq!(spec.group, "mantle.dev");
        assert_eq!(spec.scope, "Namespaced");
        assert!(spec.names.short_names.as_ref().is_some_and(|s| !s.is_empty()), "{} short names", spec.names.kind);
        assert_eq!(spec.names.categories.as_deref(), Some(&["mantle".to_string()][..]));
        let version = &spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        let columns = version.additional_printer_columns.as_ref().expect("printer columns");
        assert!(columns.len() >= 3, "{} tells its story in kubectl get", spec.names.kind);
        assert_eq!(columns.last().map(|c| c.name.as_str()), Some("Age"));
    }
}

fn collect_rules(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(rules) = map.get("x-kubernetes-validations").and_then(|v| v.as_array()) {
                out.extend(rules.iter().filter_map(|r| r["rule"].as_str().map(str::to_string)));
            }
            map.values().for_each(|v| collect_rules(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_rules(v, out)),
        _ => {}
    }
}
