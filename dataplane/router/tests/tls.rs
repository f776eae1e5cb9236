//! HTTPS: boto3 sends Bedrock API keys (AWS_BEARER_TOKEN_BEDROCK) only over TLS, so the router
//! serves it with rustls. The test makes its own CA and certificates (tests/e2e/tls_bearer.py,
//! with the venv of scripts/python-env.sh), calls Converse with boto3 and an API key, then
//! replaces the certificate files and sees the new one served without a restart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mantle_router::test_support::{StandInConfig, stand_in};
use mantle_router::{AuthConfig, Platform, RouterConfig, RunnerSpec, TlsFiles};

const TEXT: &str = "acme.text-v1:0";

fn repo_root() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("../..")
}

fn python() -> PathBuf {
    let cache = std::env::var_os("MANTLE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/mantle"));
    let python = cache.join("venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/python-env.sh (scripts/test.sh does)", python.display());
    python
}

fn script(args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join("tests/e2e/tls_bearer.py"))
        .args(args)
        .output()
        .expect("python runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "tls_bearer.py {args:?} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_calls_with_an_api_key_over_tls_and_the_certificate_reloads() {
    let dir = std::env::temp_dir().join(format!("mantle-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap().to_string();
    tokio::task::spawn_blocking({
        let d = d.clone();
        move || script(&["make-certs", &d])
    })
    .await
    .unwrap();
    let (cert, key) = (dir.join("served.crt"), dir.join("served.key"));
    std::fs::copy(dir.join("a.crt"), &cert).unwrap();
    std::fs::copy(dir.join("a.key"), &key).unwrap();
    let keys = dir.join("keys.yaml");
    std::fs::write(&keys, "tenants:\n  - name: acme\n    apiKeys: [mk-acme-0123456789abcdef]\n").unwrap();

    let s = stand_in(StandInConfig::default()).await;
    let mut config = RouterConfig::local("127.0.0.1:0".parse().unwrap());
    config.tls = Some(TlsFiles { cert: cert.clone(), key: key.clone() });
    config.auth = AuthConfig::File(keys);
    let platform = Platform {
        models: vec![
            serde_norway::from_str(&format!(
                "apiVersion: mantle.dev/v1alpha1\nkind: FoundationModel\nmetadata: {{name: m}}\nspec:\n  modelId: {TEXT}\n  provider: Acme\n  modality: TEXT\n  source: {{uri: 's3://b/m.gguf', format: gguf}}\n  contextLength: 4096\n"
            ))
            .unwrap(),
        ],
        runners: vec![RunnerSpec { model: TEXT.into(), address: s.address(), pool: None, cell: None }],
        ..Platform::default()
    };
    let router = mantle_router::start(config, platform).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !router.inference().admits(TEXT) {
        assert!(Instant::now() < deadline, "the stand-in never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("https://localhost:{}", router.addr.port());
    let port = router.addr.port().to_string();
    let ca = dir.join("ca.pem").to_str().unwrap().to_string();
    let text = tokio::task::spawn_blocking({
        let url = url.clone();
        move || script(&["converse", &url, &ca, TEXT, "mk-acme-0123456789abcdef"])
    })
    .await
    .unwrap();
    assert!(text.contains("tok0"), "{text}");

    // Renewal: the files change in place (as the kubelet updates a Secret mount).
    let served = |port: String| tokio::task::spawn_blocking(move || script(&["served-cert", "127.0.0.1", &port]));
    let before = served(port.clone()).await.unwrap();
    assert_eq!(before.trim(), std::fs::read_to_string(dir.join("a.crt")).unwrap().trim());
    std::fs::copy(dir.join("b.crt"), &cert).unwrap();
    std::fs::copy(dir.join("b.key"), &key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = served(port.clone()).await.unwrap();
        if now.trim() == std::fs::read_to_string(dir.join("b.crt")).unwrap().trim() {
            break;
        }
        assert!(Instant::now() < deadline, "the renewed certificate was never served");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    router.shutdown().await;
    std::fs::remove_dir_all(dir).ok();
}
