//! Helpers for tests (feature `test-support`): the small real models, fetched once per test
//! binary by `scripts/fetch-models.sh` (idempotent, cached outside the repository).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::{Backend, ChatMessage, GenerateRequest, TextModel};

/// Runs scripts/fetch-models.sh and returns the models directory; `MANTLE_MODELS_DIR` names one
/// filled beforehand instead (machines without PyPI, such as a GPU box the tests are copied to).
pub fn models_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("MANTLE_MODELS_DIR") {
            return PathBuf::from(dir);
        }
        let script =
            Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()))
                .join("../../scripts/fetch-models.sh");
        let out = std::process::Command::new("bash").arg(&script).output().expect("bash runs scripts/fetch-models.sh");
        assert!(out.status.success(), "fetch-models.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(stdout.lines().last().expect("fetch-models.sh prints the models directory").trim())
    })
    .clone()
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF.
pub fn smollm2_path() -> PathBuf {
    models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// SmolLM2 loaded once per test binary.
pub fn smollm2() -> Arc<TextModel> {
    static MODEL: OnceLock<Arc<TextModel>> = OnceLock::new();
    MODEL.get_or_init(|| Arc::new(TextModel::load(&smollm2_path(), None, 0).expect("SmolLM2 loads"))).clone()
}

/// The device the tensor forward pass is tested on: `MANTLE_TEST_DEVICE` (`cuda`, `cuda:N`),
/// by default candle's CPU device.
pub fn tensor_backend() -> Backend {
    let name = std::env::var("MANTLE_TEST_DEVICE").unwrap_or_else(|_| "candle-cpu".into());
    Backend::parse(&name).unwrap_or_else(|e| panic!("MANTLE_TEST_DEVICE={name}: {e}"))
}

/// SmolLM2 on [`tensor_backend`], loaded once per test binary.
pub fn smollm2_tensors() -> Arc<TextModel> {
    static MODEL: OnceLock<Arc<TextModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let model = TextModel::load_on(&smollm2_path(), None, 0, &tensor_backend()).expect("SmolLM2 loads");
            Arc::new(model)
        })
        .clone()
}

/// A greedy request to SmolLM2 with one user turn and nothing else set.
pub fn ask(id: u64, question: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest::greedy(
        id,
        smollm2().chat_prompt(&[ChatMessage::new("user", question)]).expect("the prompt renders"),
        max_tokens,
    )
}

/// all-MiniLM-L6-v2 (safetensors + tokenizer.json).
pub fn minilm_dir() -> PathBuf {
    models_dir().join("all-minilm-l6-v2")
}
