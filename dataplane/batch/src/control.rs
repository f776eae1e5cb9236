//! The control table: a Delta Lake table at `<output>/_control/` with one row per shard per run
//! (which input lines, which output file, how it went: records, tokens, attempts, times, the last
//! error), appended transactionally with delta-rs, so Spark, Databricks and the `deltalake`
//! Python package read it as the lakehouse's `bedrock_batch_control`.
//!
//! Rows are appended exactly once: each commit names the shards it records in its commit info
//! (`mantle.shards`), and a writer that starts over (a resumed job) reads the table's history and
//! leaves out the shards recorded already.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deltalake_core::arrow::array::{
    ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use deltalake_core::arrow::datatypes::{DataType as ArrowType, Field, Schema, TimeUnit};
use deltalake_core::kernel::transaction::CommitProperties;
use deltalake_core::kernel::{DataType, PrimitiveType, StructField};
use deltalake_core::logstore::{
    LogStore, LogStoreFactory, ObjectStoreRef, StorageConfig, default_logstore, logstore_factories,
};
use deltalake_core::writer::{DeltaWriter, RecordBatchWriter};
use deltalake_core::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::TryStreamExt;
use url::Url;

use crate::store::Stores;

/// The commit-info key listing the shards a commit records (`<run>/<shard>`).
const RECORDED: &str = "mantle.shards";

/// One row: a shard of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub job_id: String,
    pub run_id: String,
    pub shard_id: i32,
    pub input_file: String,
    /// The byte range the shard's lines span in the input file (its lines may not be all of it:
    /// a shard holds the records of one prompt prefix).
    pub byte_start: i64,
    pub byte_end: i64,
    pub first_line: i64,
    pub records: i64,
    pub output_file: String,
    /// The shard's partition (`partitionKey` value) when all its records share one.
    pub partition: Option<String>,
    /// `SUCCEEDED` (no error records), `PARTIAL` (some), `FAILED` (the shard did not commit).
    pub status: String,
    pub records_ok: i64,
    pub records_error: i64,
    pub records_reused: i64,
    pub records_skipped: i64,
    pub tokens_in: i64,
    pub tokens_out: i64,
    pub attempts: i32,
    /// Microseconds since the epoch.
    pub started: i64,
    pub finished: i64,
    pub duration_s: f64,
    pub last_error: Option<String>,
}

impl Row {
    /// The key a commit records it under.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.run_id, self.shard_id, self.status)
    }
}

fn columns() -> Vec<(&'static str, PrimitiveType, bool)> {
    use PrimitiveType::*;
    vec![
        ("job_id", String, false),
        ("run_id", String, false),
        ("shard_id", Integer, false),
        ("input_file", String, false),
        ("byte_start", Long, false),
        ("byte_end", Long, false),
        ("first_line", Long, false),
        ("records", Long, false),
        ("output_file", String, false),
        ("partition", String, true),
        ("status", String, false),
        ("records_ok", Long, false),
        ("records_error", Long, false),
        ("records_reused", Long, false),
        ("records_skipped", Long, false),
        ("tokens_in", Long, false),
        ("tokens_out", Long, false),
        ("attempts", Integer, false),
        ("started", Timestamp, false),
        ("finished", Timestamp, false),
        ("duration_s", Double, false),
        ("last_error", String, true),
    ]
}

fn arrow_schema() -> Arc<Schema> {
    let fields: Vec<Field> = columns()
        .into_iter()
        .map(|(name, t, nullable)| {
            let t = match t {
                PrimitiveType::String => ArrowType::Utf8,
                PrimitiveType::Integer => ArrowType::Int32,
                PrimitiveType::Long => ArrowType::Int64,
                PrimitiveType::Double => ArrowType::Float64,
                _ => ArrowType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            };
            Field::new(name, t, nullable)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// The rows as one Arrow batch, in the table's column order.
pub fn batch(rows: &[Row]) -> Result<RecordBatch, DeltaTableError> {
    let s = |f: fn(&Row) -> &str| Arc::new(StringArray::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let o = |f: fn(&Row) -> Option<&str>| Arc::new(StringArray::from_iter(rows.iter().map(f))) as ArrayRef;
    let l = |f: fn(&Row) -> i64| Arc::new(Int64Array::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let i = |f: fn(&Row) -> i32| Arc::new(Int32Array::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let t = |f: fn(&Row) -> i64| {
        Arc::new(TimestampMicrosecondArray::from_iter_values(rows.iter().map(f)).with_timezone("UTC")) as ArrayRef
    };
    let columns = vec![
        s(|r| &r.job_id),
        s(|r| &r.run_id),
        i(|r| r.shard_id),
        s(|r| &r.input_file),
        l(|r| r.byte_start),
        l(|r| r.byte_end),
        l(|r| r.first_line),
        l(|r| r.records),
        s(|r| &r.output_file),
        o(|r| r.partition.as_deref()),
        s(|r| &r.status),
        l(|r| r.records_ok),
        l(|r| r.records_error),
        l(|r| r.records_reused),
        l(|r| r.records_skipped),
        l(|r| r.tokens_in),
        l(|r| r.tokens_out),
        i(|r| r.attempts),
        t(|r| r.started),
        t(|r| r.finished),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.duration_s))),
        o(|r| r.last_error.as_deref()),
    ];
    Ok(RecordBatch::try_new(arrow_schema(), columns)?)
}

/// delta-rs's plain log store for `s3://` tables whose store we build ourselves (delta-rs's own
/// S3 support, with its DynamoDB locking, is a crate of its own we do not need: commits use the
/// store's conditional put).
#[derive(Debug)]
struct S3Logs;

impl LogStoreFactory for S3Logs {
    fn with_options(
        &self,
        prefixed: ObjectStoreRef,
        root: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> Result<Arc<dyn LogStore>, DeltaTableError> {
        Ok(default_logstore(prefixed, root, location, options))
    }
}

fn register_s3_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        logstore_factories().insert(Url::parse("s3://").expect("a URL"), Arc::new(S3Logs));
    });
}

/// Where a job's control table is, and how to reach it.
pub struct ControlTable {
    url: Url,
    /// An S3-compatible endpoint's store (delta-rs's object_store release), when there is one.
    backend: Option<Arc<dyn object_store_013::ObjectStore>>,
}

impl ControlTable {
    /// The table below an output URI (`<output>/_control`), reached as the job's stores reach it.
    pub fn for_output(stores: &Stores, output_uri: &str) -> Result<Self, DeltaTableError> {
        let bad = |e: String| DeltaTableError::InvalidTableLocation(format!("{output_uri}: {e}"));
        let mut url =
            Url::parse(&format!("{}/_control/", output_uri.trim_end_matches('/'))).map_err(|e| bad(e.to_string()))?;
        let mut backend = None;
        if url.scheme() == "s3" {
            let bucket = url.host_str().unwrap_or_default().to_string();
            if let Some(dir) = stores.buckets.get(&bucket) {
                // A bucket served from a directory: the table is a local one.
                let path = dir.join(url.path().trim_start_matches('/'));
                std::fs::create_dir_all(&path).map_err(|e| bad(e.to_string()))?;
                url = Url::from_directory_path(&path).map_err(|_| bad("not an absolute directory".into()))?;
            } else {
                let mut builder = object_store_013::aws::AmazonS3Builder::from_env().with_bucket_name(&bucket);
                for (key, value) in stores.s3_settings() {
                    builder = builder
                        .with_config(key.parse().map_err(|e: object_store_013::Error| bad(e.to_string()))?, value);
                }
                backend = Some(Arc::new(builder.build().map_err(|e| bad(e.to_string()))?)
                    as Arc<dyn object_store_013::ObjectStore>);
            }
        } else if url.scheme() == "file" {
            let path = url.to_file_path().map_err(|_| bad("not a local path".into()))?;
            std::fs::create_dir_all(&path).map_err(|e| bad(e.to_string()))?;
        } else {
            return Err(bad(format!("the control table cannot be written to {}:// yet", url.scheme())));
        }
        Ok(ControlTable { url, backend })
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    async fn open(&self) -> Result<DeltaTable, DeltaTableError> {
        let mut builder = DeltaTableBuilder::from_url(self.url.clone())?;
        if let Some(store) = &self.backend {
            register_s3_logs();
            let root = Url::parse(&format!("s3://{}/", self.url.host_str().unwrap_or_default()))
                .map_err(|e| DeltaTableError::InvalidTableLocation(e.to_string()))?;
            builder = builder.with_storage_backend(store.clone(), root);
        }
        let mut table = builder.build()?;
        match table.load().await {
            Ok(()) => Ok(table),
            Err(DeltaTableError::NotATable(_)) => {
                let fields = columns()
                    .into_iter()
                    .map(|(name, t, nullable)| StructField::new(name, DataType::Primitive(t), nullable));
                table
                    .create()
                    .with_table_name("bedrock_batch_control")
                    .with_comment("Mantle batch jobs: one row per shard per run")
                    .with_columns(fields)
                    .await
                    .or_else(|e| match e {
                        // Another writer created it first.
                        DeltaTableError::Generic(m) if m.contains("exists") => Ok(table),
                        e => Err(e),
                    })
            }
            Err(e) => Err(e),
        }
    }

    /// The rows' keys the table holds already (for a writer that starts over).
    pub async fn recorded(&self) -> Result<HashSet<String>, DeltaTableError> {
        let table = self.open().await?;
        let mut keys = HashSet::new();
        let mut history = table.history(None);
        while let Some(info) = history.try_next().await? {
            if let Some(list) = info.info.get(RECORDED).and_then(|v| v.as_array()) {
                keys.extend(list.iter().filter_map(|k| k.as_str().map(str::to_string)));
            }
        }
        Ok(keys)
    }

    /// Appends rows in one transaction.
    pub async fn append(&self, rows: &[Row]) -> Result<(), DeltaTableError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut table = self.open().await?;
        let keys: Vec<serde_json::Value> = rows.iter().map(|r| r.key().into()).collect();
        let properties =
            CommitProperties::default().with_metadata(HashMap::from([(RECORDED.to_string(), keys.into())]));
        let mut writer = RecordBatchWriter::for_table(&table)?.with_commit_properties(properties);
        writer.write(batch(rows)?).await?;
        writer.flush_and_commit(&mut table).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(shard: i32, status: &str) -> Row {
        Row {
            job_id: "j".into(),
            run_id: "initial".into(),
            shard_id: shard,
            input_file: "a.jsonl".into(),
            output_file: "j/a.jsonl.out".into(),
            status: status.into(),
            records: 3,
            records_ok: 3,
            attempts: 1,
            started: 1_700_000_000_000_000,
            finished: 1_700_000_001_000_000,
            duration_s: 1.0,
            ..Default::default()
        }
    }

    /// Rows land in a Delta table that a second writer (a resumed job) sees, with the keys of
    /// what it holds; appends are whole transactions.
    #[tokio::test]
    async fn rows_are_appended_to_a_delta_table_and_remembered_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let out = format!("file://{}/out", dir.path().display());
        let table = ControlTable::for_output(&Stores::default(), &out).unwrap();
        assert!(table.recorded().await.unwrap().is_empty());
        table.append(&[row(0, "SUCCEEDED"), row(1, "PARTIAL")]).await.unwrap();
        table.append(&[row(2, "FAILED")]).await.unwrap();
        let again = ControlTable::for_output(&Stores::default(), &out).unwrap();
        let keys = again.recorded().await.unwrap();
        assert_eq!(
            keys,
            HashSet::from(["initial/0/SUCCEEDED".into(), "initial/1/PARTIAL".into(), "initial/2/FAILED".into()])
        );
        let log = dir.path().join("out/_control/_delta_log");
        let commits = std::fs::read_dir(&log)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json"))
            .count();
        assert_eq!(commits, 3, "create, then one commit per append");
        let parquet = std::fs::read_dir(dir.path().join("out/_control"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "parquet"))
            .count();
        assert_eq!(parquet, 2);
    }
}
