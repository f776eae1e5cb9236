//! Golden tests of what the operator creates: the examples and the variants in
//! `tests/golden/variants.yaml` (GPU, External engine by image and by endpoint, scale to zero, a
//! Draining Cell, a reservation) render byte for byte to the checked-in YAML, which scripts/test.sh also validates
//! against the Kubernetes 1.34 schemas. `MANTLE_UPDATE_GOLDEN=1 cargo test -p mantle-operator`
//! rewrites the files after an intended change; review the diff.

use std::path::{Path, PathBuf};

use mantle_operator::cli::{BatchArgs, PodArgs, RenderArgs, render};
use mantle_operator::render::{Object, RenderOptions};
use mantle_operator::{Desired, Observed, plan};

fn here() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()))
}

fn args(path: &Path) -> RenderArgs {
    RenderArgs {
        paths: vec![path.to_path_buf()],
        pods: PodArgs {
            runner_image: Some("ghcr.io/mantle-dev/mantle-runner:test".into()),
            runner_cuda_image: Some("ghcr.io/mantle-dev/mantle-runner-cuda:test".into()),
            cache_root: "/var/cache/mantle/weights".into(),
            cache_budget_gib: 100,
            runner_token_secret: "mantle-runner-token".into(),
            inference_pool_endpoint_picker: None,
        },
        batch: BatchArgs {
            batch_image: Some("ghcr.io/mantle-dev/mantle-batch:test".into()),
            batch_router_url: "http://mantle-router.mantle-system:8080".into(),
            batch_token_secret: "mantle-batch-token".into(),
            batch_service_account: "mantle-batch".into(),
            batch_s3_endpoint: None,
            batch_max_workers: 16,
            region: "us-east-1".into(),
        },
    }
}

fn check_golden(rendered: &str, golden: &Path) {
    if std::env::var_os("MANTLE_UPDATE_GOLDEN").is_some() {
        std::fs::write(golden, rendered).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(golden)
        .unwrap_or_else(|e| panic!("{}: {e} (MANTLE_UPDATE_GOLDEN=1 writes it)", golden.display()));
    if rendered != expected {
        let line = rendered.lines().zip(expected.lines()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{} differs from the render at line {}:\n  rendered: {:?}\n  golden:   {:?}\n(MANTLE_UPDATE_GOLDEN=1 rewrites it)",
            golden.display(),
            line + 1,
            rendered.lines().nth(line),
            expected.lines().nth(line)
        );
    }
}

#[test]
fn the_examples_render_to_the_golden_yaml() {
    let mut out = Vec::new();
    assert!(render(&args(&here().join("../examples")), &mut out).unwrap(), "the examples plan without problems");
    check_golden(&String::from_utf8(out).unwrap(), &here().join("tests/golden/examples.rendered.yaml"));
}

#[test]
fn the_variants_render_to_the_golden_yaml() {
    let mut out = Vec::new();
    assert!(render(&args(&here().join("tests/golden/variants.yaml")), &mut out).unwrap());
    check_golden(&String::from_utf8(out).unwrap(), &here().join("tests/golden/variants.rendered.yaml"));
}

fn variants() -> (Desired, Vec<Object>) {
    let text = std::fs::read_to_string(here().join("tests/golden/variants.yaml")).unwrap();
    let desired = Desired::from_manifests(mantle_crds::parse_manifests(&text, "variants.yaml").unwrap());
    let plan = plan(&desired, &Observed::default());
    let objects = mantle_operator::render(&desired, &plan, &RenderOptions::default());
    (desired, objects)
}

fn deployment<'a>(objects: &'a [Object], name: &str) -> &'a k8s_openapi::api::apps::v1::Deployment {
    objects
        .iter()
        .find_map(|o| match o {
            Object::Deployment(d) if d.metadata.name.as_deref() == Some(name) => Some(&**d),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Deployment {name}"))
}

#[test]
fn every_pool_is_labelled_for_the_router_and_owned_by_what_it_serves() {
    let (_, objects) = variants();
    for o in &objects {
        let meta = o.metadata();
        let labels = meta.labels.as_ref().unwrap();
        assert!(labels.contains_key("mantle.dev/foundation-model"), "{} {:?}", o.kind(), meta.name);
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        let dedicated = labels.contains_key("mantle.dev/pool");
        assert_eq!(owner.kind, if dedicated { "ProvisionedThroughput" } else { "FoundationModel" });
        assert_eq!(owner.controller, Some(true));
    }
    // The reservation's pool carries its tenant and its owner's uid.
    let reserved = deployment(&objects, "llama3-8b-gpu-east-search-llama");
    assert_eq!(reserved.metadata.labels.as_ref().unwrap()["mantle.dev/pool"], "search");
    assert_eq!(reserved.metadata.owner_references.as_ref().unwrap()[0].uid, "6f1c2b9e-0000-4000-8000-000000000002");
    assert_eq!(reserved.spec.as_ref().unwrap().replicas, Some(3));
}

#[test]
fn a_gpu_model_asks_for_its_gpu_on_its_cells_nodes() {
    let (_, objects) = variants();
    let pod = deployment(&objects, "llama3-8b-gpu-east").spec.as_ref().unwrap().template.spec.clone().unwrap();
    let selector = pod.node_selector.unwrap();
    assert_eq!(selector["pool.example.com/gpu"], "h100");
    assert_eq!(selector["nvidia.com/gpu.product"], "NVIDIA-H100-80GB-HBM3");
    let runner = &pod.containers[0];
    let limits = runner.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert_eq!(runner.startup_probe.as_ref().unwrap().failure_threshold, Some(360), "30 minutes to load on a GPU");
    let caps = runner.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
    assert_eq!(caps.add.as_deref(), Some(&["IPC_LOCK".to_string()][..]), "pinned weights need IPC_LOCK");
    let fetch = &pod.init_containers.unwrap()[1];
    assert!(fetch.args.as_ref().unwrap().iter().any(|a| a.starts_with("--sha256=0f5b7e")));
    assert_eq!(fetch.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name, "model-store");
    // The Draining Cell keeps its pool until the replacement in gpu-east is ready.
    let east = deployment(&objects, "llama3-8b-gpu-east").spec.as_ref().unwrap().replicas;
    let west = deployment(&objects, "llama3-8b-gpu-west").spec.as_ref().unwrap().replicas;
    assert_eq!((east, west), (Some(4), Some(2)));
}

#[test]
fn an_external_engine_runs_beside_a_runner_that_fronts_it() {
    let (_, objects) = variants();
    let pod = deployment(&objects, "qwen-vllm-gpu-east").spec.as_ref().unwrap().template.spec.clone().unwrap();
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["runner", "engine"]);
    let runner = pod.containers[0].args.as_ref().unwrap();
    assert!(
        runner.contains(&"--engine=external".to_string())
            && runner.contains(&"--upstream=http://127.0.0.1:8000".to_string())
    );
    assert!(pod.containers[0].resources.is_none(), "the model's resources are the engine's");
    let engine = &pod.containers[1];
    assert_eq!(engine.image.as_deref(), Some("vllm/vllm-openai:v0.11.0"));
    assert_eq!(engine.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
}

#[test]
fn an_external_endpoint_gets_a_runner_alone_with_nothing_to_fetch() {
    let (_, objects) = variants();
    let pod =
        deployment(&objects, "shared-llama-server-gpu-east").spec.as_ref().unwrap().template.spec.clone().unwrap();
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["runner"]);
    let args = pod.containers[0].args.as_ref().unwrap();
    assert_eq!(
        args[..3],
        ["serve", "--engine=external", "--upstream=http://llama-server.inference.svc:8080"],
        "{args:?}"
    );
    assert!(args.contains(&"--upstream-model=llama-3.2-1b-instruct".to_string()), "{args:?}");
    assert!(pod.init_containers.is_none(), "no weights to fetch");
    assert!(pod.affinity.is_none(), "no cache to prefer");
    let volumes: Vec<&str> = pod.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert_eq!(volumes, ["runner-token"]);
    assert!(pod.containers[0].resources.is_none());
}

#[test]
fn a_model_that_scales_to_zero_has_no_pods_until_asked() {
    let (_, objects) = variants();
    assert_eq!(deployment(&objects, "tiny-batch-gpu-east").spec.as_ref().unwrap().replicas, Some(0));
}

#[test]
fn with_an_endpoint_picker_external_models_get_an_inference_pool_of_their_engine_port() {
    let text = std::fs::read_to_string(here().join("tests/golden/variants.yaml")).unwrap();
    let desired = Desired::from_manifests(mantle_crds::parse_manifests(&text, "variants.yaml").unwrap());
    let picker = "gateway-epp:9002".parse().unwrap();
    let options = RenderOptions { endpoint_picker: Some(picker), ..RenderOptions::default() };
    let objects = mantle_operator::render(&desired, &plan(&desired, &Observed::default()), &options);
    let pools: Vec<&Object> = objects.iter().filter(|o| o.kind() == "InferencePool").collect();
    assert_eq!(pools.len(), 1, "only the External-engine model run from an image");
    let Object::InferencePool(pool) = pools[0] else { unreachable!() };
    assert_eq!(pool.metadata.name.as_deref(), Some("qwen-vllm"));
    let spec = &pool.data["spec"];
    assert_eq!(spec["selector"]["matchLabels"]["mantle.dev/foundation-model"], "qwen-vllm");
    assert_eq!(spec["endpointPickerRef"]["name"], "gateway-epp");
    assert_eq!(spec["endpointPickerRef"]["port"]["number"], 9002);
    assert!(spec["targetPorts"][0]["number"].as_i64().unwrap() > 0);
    assert!("nocolon".parse::<mantle_operator::render::EndpointPicker>().is_err());
}
