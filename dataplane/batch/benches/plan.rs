//! Planning a batch job's input: `cargo bench -p mantle-batch --bench plan`.
//!
//! Writes synthetic Bedrock records (an Anthropic messages body: a shared system prompt and
//! ~`MANTLE_BENCH_TOKENS` tokens of customer text each; `MANTLE_BENCH_RECORDS` records, default
//! 20,000, in 20 files) to a directory, then times, interleaved and after a warm-up, (a) reading
//! every file through the object store in the planner's ranges, one file after another (the I/O
//! floor), and (b) planning the shards (files parsed in parallel, one per core), and reports the
//! medians, their ranges, the ratio, and the process's peak RSS.

use std::io::Write;
use std::time::Instant;

use mantle_batch::Stores;
use mantle_batch::job::{cut, list_input};
use mantle_batch::plan::TokenEstimate;
use mantle_crds::BatchJobSpec;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let records = env("MANTLE_BENCH_RECORDS", 20_000);
    let tokens = env("MANTLE_BENCH_TOKENS", 10_000);
    let files = 20;
    let cache = std::env::var("MANTLE_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/mantle"));
    let dir = cache.join(format!("bench-batch/{records}x{tokens}"));
    let words = ["invoice", "late", "support", "ticket", "plan", "upgrade", "login", "refund", "churn", "renewal"];
    if !dir.join("done").exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let system = "You summarise customer accounts as JSON with keys summary and churnRisk. ".repeat(8);
        for f in 0..files {
            let mut out =
                std::io::BufWriter::new(std::fs::File::create(dir.join(format!("part-{f:05}.jsonl"))).unwrap());
            for r in (f..records).step_by(files as usize) {
                // About 4 bytes a token (7 bytes a word).
                let body: String =
                    (0..tokens * 4 / 7).map(|i| words[((r * 7 + i) % 10) as usize]).collect::<Vec<_>>().join(" ");
                writeln!(
                    out,
                    r#"{{"recordId":"CUST{r:07}","customerId":"C{r}","modelInput":{{"anthropic_version":"bedrock-2023-05-31","max_tokens":512,"system":"{system}","messages":[{{"role":"user","content":[{{"type":"text","text":"{body}"}}]}}]}}}}"#
                )
                .unwrap();
            }
        }
        std::fs::write(dir.join("done"), b"").unwrap();
    }
    let bytes: u64 = std::fs::read_dir(&dir).unwrap().filter_map(Result::ok).map(|e| e.metadata().unwrap().len()).sum();
    let input = Stores::default().open(&format!("file://{}/", dir.display())).unwrap();
    let spec: BatchJobSpec = serde_json::from_value(serde_json::json!({
        "modelId": "m", "input": {"uri": "s3://b/in/"}, "output": {"uri": "s3://b/out/"},
        "sharding": {"targetTokensPerShard": 10_000_000, "maxRecordsPerShard": 2000}
    }))
    .unwrap();
    // Reading every byte as the planner does (8 MiB ranges, one file after another).
    let read_all = || async {
        use object_store::ObjectStoreExt;
        let mut n = 0u64;
        for (path, _) in list_input(&input).await.unwrap() {
            let size = input.store.head(&path).await.unwrap().size;
            let mut pos = 0;
            while pos < size {
                let end = (pos + (8 << 20)).min(size);
                n += input.store.get_range(&path, pos..end).await.unwrap().len() as u64;
                pos = end;
            }
        }
        n
    };
    let plan = || async {
        let files = list_input(&input).await.unwrap();
        cut(&spec, &input, files, TokenEstimate { bytes_per_token: 4.0 }, |_| {}).await.unwrap()
    };
    // Warm-up (the page cache, the allocator).
    assert_eq!(read_all().await, bytes);
    let p = plan().await;
    assert_eq!(p.total_records, records);
    let (mut reads, mut plans) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        read_all().await;
        reads.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let p = plan().await;
        plans.push(t.elapsed().as_secs_f64());
        assert_eq!(p.total_records, records);
    }
    let (r_lo, r_hi) = (reads.iter().copied().fold(f64::MAX, f64::min), reads.iter().copied().fold(0.0, f64::max));
    let (p_lo, p_hi) = (plans.iter().copied().fold(f64::MAX, f64::min), plans.iter().copied().fold(0.0, f64::max));
    let (r, pl) = (median(&mut reads), median(&mut plans));
    let gb = bytes as f64 / 1e9;
    println!("input: {records} records of ~{tokens} tokens, {gb:.2} GB in {files} files, {} shards", p.shards.len());
    println!("read through the object store: {r:.2} s median ({r_lo:.2}–{r_hi:.2}), {:.2} GB/s", gb / r);
    println!(
        "plan:                          {pl:.2} s median ({p_lo:.2}–{p_hi:.2}), {:.2} GB/s, {:.0} records/s",
        gb / pl,
        records as f64 / pl
    );
    println!("plan / read: {:.2}x; peak RSS {:.0} MiB", pl / r, peak_rss_mib());
}
