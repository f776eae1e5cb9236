//! Metering: one record per request that reached inference (settled once, in
//! [`crate::inference::Ledger`], however many runners or retries it took), written by a background task so inference never waits on
//! the sink. Records go through a bounded channel with `try_send`; when the sink lags behind, a
//! record is dropped and counted (`mantle_router_metering_dropped_total`) rather than blocking a
//! request or growing memory without bound.

use std::path::PathBuf;

use prometheus::IntCounter;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Records buffered between requests and the writer.
const BUFFER: usize = 16_384;

#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeteringRecord {
    pub request_id: String,
    /// Seconds since the epoch, with milliseconds.
    pub timestamp: f64,
    pub tenant: String,
    pub api: &'static str,
    /// The model asked for, and the one that answered (differs after a fallback).
    pub model: String,
    pub model_used: String,
    /// Every prompt token, those read from the prefix cache included (unlike Converse's
    /// `inputTokens`, which leaves them out).
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// The part of `input_tokens` read from the prefix cache; `input_tokens - cached_tokens` were
    /// computed afresh.
    pub cached_tokens: u32,
    pub queue_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub total_ms: f64,
    /// US dollars, from the model's prices; zero for CountTokens and for an answer that broke off
    /// through the platform's fault (its tokens are still recorded).
    pub cost: f64,
    /// `end_turn`, `max_tokens`, …, `cancelled` or an error kind.
    pub outcome: String,
}

/// Where records go.
#[derive(Clone)]
pub struct Meter {
    tx: Option<mpsc::Sender<MeteringRecord>>,
    dropped: IntCounter,
}

impl Meter {
    /// A meter that appends JSON lines to `path` (created if missing). When the file passes
    /// `max_bytes` it is renamed to `<path>.1` (replacing the previous one) and a new file is
    /// started, so the two never hold more than about twice `max_bytes`.
    pub fn jsonl(path: PathBuf, max_bytes: u64, dropped: IntCounter) -> Self {
        let (tx, mut rx) = mpsc::channel::<MeteringRecord>(BUFFER);
        tokio::spawn(async move {
            let mut sink = match Sink::open(path.clone()).await {
                Ok(sink) => sink,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot open the metering file; records are discarded");
                    while rx.recv().await.is_some() {}
                    return;
                }
            };
            while let Some(record) = rx.recv().await {
                let mut batch = vec![record];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let mut lines = Vec::new();
                for r in &batch {
                    if serde_json::to_writer(&mut lines, r).is_ok() {
                        lines.push(b'\n');
                    }
                }
                if let Err(e) = sink.write(&lines, max_bytes).await {
                    tracing::error!(path = %path.display(), error = %e, "writing metering records");
                }
            }
        });
        Meter { tx: Some(tx), dropped }
    }

    /// A meter that keeps nothing.
    pub fn disabled(dropped: IntCounter) -> Self {
        Meter { tx: None, dropped }
    }

    /// Hands a record to the writer without waiting.
    pub fn record(&self, record: MeteringRecord) {
        if let Some(tx) = &self.tx
            && tx.try_send(record).is_err()
        {
            self.dropped.inc();
        }
    }
}

/// The open metering file and how much it holds.
struct Sink {
    path: PathBuf,
    file: tokio::io::BufWriter<tokio::fs::File>,
    bytes: u64,
}

impl Sink {
    async fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = tokio::fs::OpenOptions::new().create(true).append(true).open(&path).await?;
        let bytes = file.metadata().await?.len();
        Ok(Sink { path, file: tokio::io::BufWriter::new(file), bytes })
    }

    async fn write(&mut self, lines: &[u8], max_bytes: u64) -> std::io::Result<()> {
        if self.bytes > 0 && self.bytes + lines.len() as u64 > max_bytes {
            self.file.flush().await?;
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            tokio::fs::rename(&self.path, &rotated).await?;
            *self = Sink::open(self.path.clone()).await?;
        }
        self.file.write_all(lines).await?;
        self.file.flush().await?;
        self.bytes += lines.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> MeteringRecord {
        MeteringRecord {
            request_id: id.into(),
            timestamp: 1.0,
            tenant: "t".into(),
            api: "Converse",
            model: "m".into(),
            model_used: "m".into(),
            input_tokens: 1,
            output_tokens: 2,
            cached_tokens: 0,
            queue_ms: 0.0,
            prefill_ms: 0.0,
            decode_ms: 0.0,
            total_ms: 0.0,
            cost: 0.0,
            outcome: "end_turn".into(),
        }
    }

    #[tokio::test]
    async fn records_become_json_lines() {
        let path = std::env::temp_dir().join(format!("mantle-metering-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let dropped = IntCounter::new("d", "d").unwrap();
        let meter = Meter::jsonl(path.clone(), 1 << 20, dropped.clone());
        for i in 0..3 {
            meter.record(record(&format!("r{i}")));
        }
        let mut lines = Vec::new();
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            lines = std::fs::read_to_string(&path).unwrap_or_default().lines().map(str::to_owned).collect();
            if lines.len() == 3 {
                break;
            }
        }
        assert_eq!(lines.len(), 3);
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!((first["requestId"].as_str(), first["outputTokens"].as_u64()), (Some("r0"), Some(2)));
        assert_eq!(dropped.get(), 0);
        std::fs::remove_file(path).ok();
    }

    #[tokio::test]
    async fn a_full_file_is_rotated_not_grown() {
        let path = std::env::temp_dir().join(format!("mantle-metering-rotate-{}.jsonl", std::process::id()));
        let rotated = path.with_extension("jsonl.1");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&rotated);
        let line = serde_json::to_vec(&record("r0")).unwrap().len() as u64 + 1;
        let meter = Meter::jsonl(path.clone(), line * 3, IntCounter::new("d2", "d").unwrap());
        for i in 0..5 {
            meter.record(record(&format!("r{i}")));
            // One record per write, so the rotation point is exact.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let count = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default().lines().count();
        for _ in 0..100 {
            if count(&path) + count(&rotated) == 5 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!((count(&rotated), count(&path)), (3, 2));
        std::fs::remove_file(path).ok();
        std::fs::remove_file(rotated).ok();
    }
}
