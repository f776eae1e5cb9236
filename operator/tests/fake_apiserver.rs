//! `mantle-operator` end to end against an API server (`../shared/tools/fake_apiserver.py`: in
//! memory, with discovery, server-side apply, status subresources, watches and owner-reference
//! garbage collection; no kubelet): the examples applied become the runner pools `mantle render`
//! shows, statuses follow the Deployments' readiness, a spec change prunes what it no longer
//! plans, and a second replica takes over when the leader dies.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()))
        .parent()
        .expect("operator/ sits in the repository")
        .to_path_buf()
}

fn python() -> PathBuf {
    let cache = std::env::var_os("MANTLE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/mantle"));
    cache.join("venv/bin/python")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills the process when the test ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Api {
    script: PathBuf,
    server: String,
}

impl Api {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(python())
            .arg(&self.script)
            .args(args)
            .args(["--server", &self.server])
            .output()
            .expect("the fake API server's helper runs");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn list(&self, kind: &str) -> Vec<Value> {
        let out: Value = serde_json::from_str(&self.run(&["list", kind, "-n", "default"])).unwrap();
        out["items"].as_array().cloned().unwrap_or_default()
    }

    fn names(&self, kind: &str) -> Vec<String> {
        let mut names: Vec<String> =
            self.list(kind).iter().map(|o| o["metadata"]["name"].as_str().unwrap().to_string()).collect();
        names.sort();
        names
    }

    fn get(&self, kind: &str, name: &str) -> Value {
        serde_json::from_str(&self.run(&["get", kind, "default", name])).unwrap()
    }
}

fn until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    std::io::Write::write_all(&mut stream, format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

fn operator(kubeconfig: &Path, identity: &str, metrics: SocketAddr) -> Process {
    Process(
        Command::new(env!("CARGO_BIN_EXE_mantle-operator"))
            .args(["--leader-election-namespace", "default", "--lease-duration-s", "3", "--metrics-listen"])
            .arg(metrics.to_string())
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", identity)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("mantle-operator starts"),
    )
}

#[test]
fn the_operator_creates_what_render_shows_follows_readiness_prunes_and_fails_over() {
    let script = repo_root().join("../shared/tools/fake_apiserver.py");
    assert!(script.exists(), "{} is missing", script.display());
    assert!(python().exists(), "{} is missing: run scripts/python-env.sh", python().display());
    let dir = std::env::temp_dir().join(format!("mantle-operator-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let port = free_port();
    let _server = Process(
        Command::new(python())
            .arg(&script)
            .args(["serve", "--port", &port.to_string(), "--lenient-namespaces", "--crds"])
            .arg(repo_root().join("crds/manifests"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the fake API server starts"),
    );
    let api = Api { script, server: format!("http://127.0.0.1:{port}") };
    until("the API server answers", Duration::from_secs(20), || {
        (kubeconfig.exists() && http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/version").is_some())
            .then_some(())
    });
    let examples = repo_root().join("examples");
    let files =
        ["cells.yaml", "foundationmodel-smollm2.yaml", "foundationmodel-minilm.yaml", "provisionedthroughput.yaml"];
    let paths: Vec<String> = files.iter().map(|f| examples.join(f).display().to_string()).collect();
    let mut apply = vec!["apply"];
    apply.extend(paths.iter().map(String::as_str));
    api.run(&apply);

    let (metrics_a, metrics_b) = (free_port(), free_port());
    let metrics_a: SocketAddr = format!("127.0.0.1:{metrics_a}").parse().unwrap();
    let metrics_b: SocketAddr = format!("127.0.0.1:{metrics_b}").parse().unwrap();
    let mut leader = operator(&kubeconfig, "operator-a", metrics_a);
    // The pools `mantle render` shows for the examples.
    let expected = [
        "all-minilm-l6-v2-cell-a",
        "smollm2-135m-instruct-cell-a",
        "smollm2-135m-instruct-cell-a-analytics-smollm2",
        "smollm2-135m-instruct-cell-b",
        "smollm2-135m-instruct-cell-b-analytics-smollm2",
    ];
    until("the runner pools exist", Duration::from_secs(30), || (api.names("deploy") == expected).then_some(()));
    assert_eq!(api.names("service"), expected);
    assert_eq!(api.names("pdb"), expected);
    let model = api.get("fm", "smollm2-135m-instruct");
    assert_eq!(model["status"]["phase"], "Pending", "{}", model["status"]);
    // The Deployments become ready (as the kubelet would make them): the statuses follow.
    for name in expected {
        api.run(&["ready", "deploy", "default", name]);
    }
    until("the model is Ready", Duration::from_secs(30), || {
        let status = api.get("fm", "smollm2-135m-instruct")["status"].clone();
        (status["phase"] == "Ready" && status["readyReplicas"] == 4).then_some(())
    });
    until("the reservation is in service", Duration::from_secs(30), || {
        let status = api.get("pt", "analytics-smollm2")["status"].clone();
        (status["phase"] == "InService"
            && status["arn"] == "arn:mantle:bedrock:cell-a:default:provisioned-model/analytics-smollm2")
            .then_some(())
    });
    let events: Vec<String> =
        api.list("events.events.k8s.io").iter().filter_map(|e| e["reason"].as_str().map(String::from)).collect();
    assert!(events.iter().any(|r| r == "PoolsApplied"), "{events:?}");
    // The model leaves cell-b: its pools there (shared and reserved) go.
    let mut model = api.get("fm", "smollm2-135m-instruct");
    model["spec"]["cells"] = serde_json::json!(["cell-a"]);
    let edited = dir.join("smollm2.json");
    std::fs::write(&edited, model.to_string()).unwrap();
    api.run(&["apply", edited.to_str().unwrap()]);
    until("cell-b's pools are pruned", Duration::from_secs(30), || {
        let names = api.names("deploy");
        (!names.iter().any(|n| n.contains("cell-b"))).then_some(names)
    });
    assert_eq!(api.get("pt", "analytics-smollm2")["status"]["provisionedReplicas"], 2, "both replicas in cell-a now");
    // A second replica follows; when the leader dies, it takes over within the Lease's duration.
    let _follower = operator(&kubeconfig, "operator-b", metrics_b);
    until("the follower says so", Duration::from_secs(20), || {
        (http_get(metrics_b, "/readyz")? == "following").then_some(())
    });
    assert_eq!(http_get(metrics_a, "/readyz").as_deref(), Some("leading"));
    assert!(
        http_get(metrics_a, "/metrics").unwrap().contains("mantle_operator_reconciles_total{kind=\"FoundationModel\"}")
    );
    leader.0.kill().unwrap();
    leader.0.wait().unwrap();
    until("the follower leads", Duration::from_secs(20), || {
        (http_get(metrics_b, "/readyz")? == "leading").then_some(())
    });
    // The new leader reconciles: a model added now gets its pool.
    let mut minilm = api.get("fm", "all-minilm-l6-v2");
    minilm["metadata"] = serde_json::json!({"name": "minilm-two", "namespace": "default"});
    minilm["spec"]["modelId"] = "acme.minilm-two-v1:0".into();
    minilm.as_object_mut().unwrap().remove("status");
    let added = dir.join("minilm-two.json");
    std::fs::write(&added, minilm.to_string()).unwrap();
    api.run(&["apply", added.to_str().unwrap()]);
    until("the new leader reconciles", Duration::from_secs(30), || {
        api.names("deploy").contains(&"minilm-two-cell-a".to_string()).then_some(())
    });
    std::fs::remove_dir_all(dir).ok();
}
