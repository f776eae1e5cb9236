//! The runner command line rendered from the example FoundationModels, as golden text.

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
    let args = runner_args(&fm, &placement(&fm.spec.source.uri)).join(" ");
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
    let args = runner_args(&fm, &placement(&fm.spec.source.uri));
    assert!(!args.iter().any(|a| a.starts_with("--chat-template")), "{args:?}");
    fm.spec.chat_template = Some(mantle_crds::ChatTemplate::ChatML);
    let args = runner_args(&fm, &placement(&fm.spec.source.uri));
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
