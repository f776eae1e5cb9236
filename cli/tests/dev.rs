//! End to end: `mantle dev` with the real models, driven by boto3 and the OpenAI Python client
//! (`tests/e2e/sdk_clients.py`, run with the venv of scripts/python-env.sh); then Ctrl-C stops
//! every child process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()))
        .parent()
        .expect("cli/ sits in the repository")
        .to_path_buf()
}

fn cache() -> PathBuf {
    std::env::var_os("MANTLE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/mantle"))
}

fn status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The process's children, whichever of its threads started them.
fn children(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().filter_map(Result::ok);
    tasks
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `mantle dev` with `extra` arguments on a free port, and waits until it is ready.
fn start_dev(extra: &[&std::ffi::OsStr], stdout: Stdio) -> (Dev, SocketAddr) {
    let python = cache().join("venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/python-env.sh (scripts/test.sh does)", python.display());
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut dev = Dev(Command::new(env!("CARGO_BIN_EXE_mantle"))
        .args(["dev", "--listen", &addr.to_string(), "--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .current_dir(repo_root())
        .env("RUST_LOG", "warn")
        // For batch jobs' S3 (moto accepts any).
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .stdout(stdout)
        .spawn()
        .expect("mantle dev starts"));
    let started = Instant::now();
    while status(addr, "/readyz") != Some(200) {
        assert!(dev.0.try_wait().unwrap().is_none(), "mantle dev exited before it was ready");
        assert!(started.elapsed() < Duration::from_secs(600), "not ready after 10 minutes");
        std::thread::sleep(Duration::from_millis(250));
    }
    (dev, addr)
}

#[test]
fn boto3_and_openai_clients_work_against_mantle_dev() {
    let python = cache().join("venv/bin/python");
    let (mut dev, addr) = start_dev(&[], Stdio::piped());
    let runners = children(dev.0.id());
    // The operator's plan for examples/: SmolLM2 in two Cells, its reservation's two replicas
    // (one per Cell), and MiniLM in one Cell.
    assert_eq!(runners.len(), 5, "one runner process per pool replica");

    let out = Command::new(&python)
        .arg(repo_root().join("tests/e2e/sdk_clients.py"))
        .arg(format!("http://{addr}"))
        .output()
        .expect("python runs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "the SDK clients failed:\n{report}");

    // The banner tells a user what to run.
    let _ = Command::new("kill").args(["-INT", &dev.0.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = dev.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "mantle dev did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit}");
    let mut banner = String::new();
    dev.0.stdout.take().unwrap().read_to_string(&mut banner).unwrap();
    assert!(
        banner.contains(&format!("Mantle is ready at http://{addr}")) && banner.contains("boto3.client"),
        "{banner}"
    );
    for pid in runners {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")),
            "runner {pid} outlived mantle dev"
        );
    }
}

/// Whether a process is gone (or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
}

#[test]
fn mantle_dev_follows_its_manifests_restarts_dead_runners_and_takes_them_along_when_killed() {
    let python = cache().join("venv/bin/python");
    // One model, in no Cell: one runner.
    let dir = std::env::temp_dir().join(format!("mantle-dev-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = std::fs::read_to_string(repo_root().join("examples/foundationmodel-smollm2.yaml")).unwrap();
    let model: String =
        model.lines().filter(|l| !l.trim_start().starts_with("cells:")).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("smollm2.yaml"), model).unwrap();
    let (mut dev, addr) = start_dev(&["--manifests".as_ref(), dir.as_os_str()], Stdio::null());
    let out = Command::new(&python)
        .arg(repo_root().join("tests/e2e/dev_live.py"))
        .arg(format!("http://{addr}"))
        .arg(&dir)
        .arg(dev.0.id().to_string())
        .output()
        .expect("python runs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "the live checks failed:\n{report}");
    assert!(dev.0.try_wait().unwrap().is_none(), "mantle dev exited");
    // SIGKILL gives mantle dev no chance to stop its runners: the kernel does. (A runner it
    // stopped a moment ago may not be reaped yet: a zombie is not a runner.)
    let runners: Vec<u32> = children(dev.0.id()).into_iter().filter(|&pid| !gone(pid)).collect();
    assert_eq!(runners.len(), 1, "{runners:?}");
    dev.0.kill().unwrap();
    dev.0.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !runners.iter().all(|&pid| gone(pid)) {
        assert!(Instant::now() < deadline, "runners {runners:?} outlived a killed mantle dev");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Runs a phase of `tests/e2e/external_engine.py` against `mantle dev` and the upstream.
fn external_phase(phase: &str, addr: SocketAddr, upstream: &str) {
    let out = Command::new(cache().join("venv/bin/python"))
        .arg(repo_root().join("tests/e2e/external_engine.py"))
        .args([phase, &format!("http://{addr}"), upstream])
        .output()
        .expect("python runs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "external engine, phase {phase}, failed:\n{report}");
}

#[test]
fn mantle_dev_fronts_a_running_llama_server_through_an_external_foundation_model() {
    use mantle_runner::test_support::LlamaServer;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let model = cache().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut server = rt.block_on(LlamaServer::start(&model, 2, 2));
    let dir = std::env::temp_dir().join(format!("mantle-dev-external-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("external.yaml"),
        format!(
            "apiVersion: mantle.dev/v1alpha1
kind: FoundationModel
metadata:
  name: smollm2-external
spec:
  modelId: acme.smollm2-external-v1:0
  provider: Acme
  modality: TEXT
  source:
    uri: file://{model}
    format: gguf
  engine:
    type: External
    external:
      endpoint: {endpoint}
  contextLength: 2048
  replicas:
    min: 1
    max: 1
",
            model = model.display(),
            endpoint = server.url()
        ),
    )
    .unwrap();
    let (_dev, addr) = start_dev(&["--manifests".as_ref(), dir.as_os_str()], Stdio::null());
    external_phase("up", addr, &server.url());
    server.kill();
    // The runner sees it within two 500 ms health intervals; the router within a Health beat.
    std::thread::sleep(Duration::from_millis(1500));
    external_phase("down", addr, &server.url());
    rt.block_on(server.restart());
    let back = Instant::now();
    while status(addr, "/readyz") != Some(200) {
        assert!(back.elapsed() < Duration::from_secs(10), "not ready again 10 s after the upstream returned");
        std::thread::sleep(Duration::from_millis(100));
    }
    external_phase("back", addr, &server.url());
    std::fs::remove_dir_all(dir).ok();
}

/// moto's S3 server on a free loopback port, stopped on drop.
struct Moto(Child, String);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto() -> Moto {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(cache().join("venv/bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts (scripts/python-env.sh installs it)");
    let moto = Moto(child, format!("http://127.0.0.1:{port}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    moto
}

/// Runs a phase of tests/e2e/batch_flow.py; its report on success.
fn batch_flow(addr: SocketAddr, moto: &Moto, args: &[&str]) -> String {
    let out = Command::new(cache().join("venv/bin/python"))
        .arg(repo_root().join("tests/e2e/batch_flow.py"))
        .arg(format!("http://{addr}"))
        .arg(&moto.1)
        .args(args)
        .output()
        .expect("python runs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "batch_flow.py {args:?} failed:\n{report}");
    report
}

#[test]
fn boto3_batch_jobs_run_on_mantle_dev_with_s3_and_survive_its_restart() {
    let moto = moto();
    // One model, in no Cell: one runner.
    let dir = std::env::temp_dir().join(format!("mantle-dev-batch-{}", std::process::id()));
    let state = dir.join("state");
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let model = std::fs::read_to_string(repo_root().join("examples/foundationmodel-smollm2.yaml")).unwrap();
    let model: String =
        model.lines().filter(|l| !l.trim_start().starts_with("cells:")).map(|l| format!("{l}\n")).collect();
    std::fs::write(manifests.join("smollm2.yaml"), model).unwrap();
    let lake = dir.join("lake");
    let bucket = format!("locallake={}", lake.display());
    let args = [
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--s3-endpoint".as_ref(),
        moto.1.as_ref(),
        "--bucket".as_ref(),
        bucket.as_ref(),
        "--batch-state".as_ref(),
        state.as_os_str(),
    ];
    let (mut dev, addr) = start_dev(&args, Stdio::null());
    batch_flow(addr, &moto, &["flow"]);
    batch_flow(addr, &moto, &["manifests", manifests.to_str().unwrap(), lake.to_str().unwrap()]);

    // Killed mid-job (no chance to clean up), started again: the job resumes and every record
    // is written exactly once.
    let report = batch_flow(addr, &moto, &["start"]);
    let line = report.lines().find(|l| l.starts_with("ARN ")).expect("the job's ARN");
    let parts: Vec<&str> = line.split_whitespace().collect();
    let (arn, out) = (parts[1].to_string(), parts[3].to_string());
    dev.0.kill().unwrap();
    dev.0.wait().unwrap();
    let (_dev, addr) = start_dev(&args, Stdio::null());
    batch_flow(addr, &moto, &["finish", &arn, &out]);
    std::fs::remove_dir_all(dir).ok();
}
