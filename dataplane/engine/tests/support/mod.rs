//! Test support: the real SmolLM2 model, fetched once by scripts/fetch-models.sh.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use mantle_engine::TextModel;

/// Runs scripts/fetch-models.sh (idempotent) and returns the models directory.
pub fn models_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new("bash")
            .arg(root.join("scripts/fetch-models.sh"))
            .output()
            .expect("bash runs scripts/fetch-models.sh");
        assert!(out.status.success(), "fetch-models.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(stdout.lines().last().expect("fetch-models.sh prints the models directory").trim())
    })
    .clone()
}

pub fn smollm2_path() -> PathBuf {
    models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// SmolLM2-135M-Instruct, loaded once per test binary.
pub fn smollm2() -> Arc<TextModel> {
    static MODEL: OnceLock<Arc<TextModel>> = OnceLock::new();
    MODEL.get_or_init(|| Arc::new(TextModel::load(&smollm2_path(), None).expect("SmolLM2 loads"))).clone()
}
