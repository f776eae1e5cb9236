//! The runner command line rendered from the example FoundationModels, as golden text, and the
//! sidecar's command line for External engines.

use std::path::Path;

use mantle_crds::{Manifest, read_manifest_dir};
use mantle_operator::{RunnerPlacement, runner_args};

fn example(name: &str) -> mantle_crds::FoundationModel {
    let dir = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()))
        .join("../examples");
    read_manifest_dir(&dir)
        .unwrap()
        .into_iter()
        .find_map(|(_, m)| match m {
            Manifest::FoundationModel(fm) if fm.metadata.name.as_deref() == Some(name) => Some(fm),
            _ => None,
        })
        .unwrap()
}

fn source_uri(fm: &mantle_crds::FoundationModel) -> String {
    fm.spec.source.as_ref().expect("the example names its weights").uri.clone()
}

fn placement(model: &str) -> RunnerPlacement {
    RunnerPlacement {
        model: model.into(),
        grpc_listen: "0.0.0.0:50051".into(),
        http_listen: "0.0.0.0:9090".into(),
        threads: 0,
        cache_dir: Some("/var/cache/mantle/weights".into()),
        device: None,
        cache_priority: 0,
    }
}

#[test]
fn smollm2_runner_args() {
    let fm = example("smollm2-135m-instruct");
    let args = runner_args(&fm, &placement(&source_uri(&fm))).join(" ");
    assert_eq!(
        args,
        "serve --model=s3://mantle-models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
         --model-id=huggingfacetb.smollm2-135m-instruct-v1:0 --listen=0.0.0.0:50051 --http-listen=0.0.0.0:9090 \
         --threads=0 --sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
         --cache-dir=/var/cache/mantle/weights --pin-weights"
    );
}

#[test]
fn a_chat_template_family_is_passed_only_when_the_model_names_one() {
    // The example leaves the template to the GGUF file, so no override reaches the runner.
    let mut fm = example("smollm2-135m-instruct");
    let args = runner_args(&fm, &placement(&source_uri(&fm)));
    assert!(!args.iter().any(|a| a.starts_with("--chat-template")), "{args:?}");
    fm.spec.chat_template = Some(mantle_crds::ChatTemplate::ChatML);
    let args = runner_args(&fm, &placement(&source_uri(&fm)));
    assert!(args.contains(&"--chat-template=chatml".to_string()), "{args:?}");
}

#[test]
fn minilm_runner_args() {
    let fm = example("all-minilm-l6-v2");
    let args = runner_args(&fm, &RunnerPlacement { cache_dir: None, ..placement("/models/all-minilm-l6-v2") });
    assert_eq!(
        args[..3],
        ["serve", "--model=/models/all-minilm-l6-v2", "--model-id=sentence-transformers.all-minilm-l6-v2-v1:0"]
    );
    assert!(!args.iter().any(|a| a.starts_with("--chat-template") || a.starts_with("--cache-dir")), "{args:?}");
}

/// An External FoundationModel with `external` as its engine settings.
fn external(modality: &str, external: &str) -> mantle_crds::FoundationModel {
    serde_norway::from_str(&format!(
        "apiVersion: mantle.dev/v1alpha1
kind: FoundationModel
metadata: {{name: ext}}
spec:
  modelId: acme.ext-v1:0
  provider: Acme
  modality: {modality}
  contextLength: 4096
  chatTemplate: ChatML
  weightCache: {{tiers: [HostMemory], pinInHostMemory: true}}
  engine:
    type: External
    external: {external}
"
    ))
    .expect("a FoundationModel")
}

#[test]
fn an_endpoint_model_runs_the_sidecar_against_that_endpoint() {
    let fm = external("TEXT", "{endpoint: 'http://127.0.0.1:11434', model: 'smollm2:135m'}");
    let args = runner_args(&fm, &placement("/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(
        args.join(" "),
        "serve --engine=external --upstream=http://127.0.0.1:11434 --model-id=acme.ext-v1:0 \
         --listen=0.0.0.0:50051 --http-listen=0.0.0.0:9090 --modality=text --upstream-model=smollm2:135m \
         --model=/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
}

#[test]
fn an_image_model_runs_the_sidecar_against_its_container_in_the_pod() {
    let fm = external("EMBEDDING", "{image: 'vllm/vllm-openai:v0.11.0', port: 8001}");
    let args = runner_args(&fm, &placement(""));
    assert_eq!(
        args.join(" "),
        "serve --engine=external --upstream=http://127.0.0.1:8001 --model-id=acme.ext-v1:0 \
         --listen=0.0.0.0:50051 --http-listen=0.0.0.0:9090 --modality=embedding"
    );
}

#[test]
fn the_sidecar_gets_none_of_the_builtin_engines_flags() {
    // Threads, device, the weight cache, pinning and the chat template are the builtin engine's:
    // the server applies its own template and holds its own weights.
    let fm = external("TEXT", "{endpoint: 'https://llm.example.com/base'}");
    let placement = RunnerPlacement { threads: 4, device: Some("cuda".into()), cache_priority: 2, ..placement("") };
    let args = runner_args(&fm, &placement);
    let builtin = ["--threads", "--device", "--cache-", "--pin-weights", "--chat-template", "--sha256"];
    for flag in builtin.iter().chain(&["--model=", "--upstream-model"]) {
        assert!(!args.iter().any(|a| a.starts_with(flag)), "{flag} in {args:?}");
    }
    assert!(args.contains(&"--upstream=https://llm.example.com/base".to_string()), "{args:?}");
}
