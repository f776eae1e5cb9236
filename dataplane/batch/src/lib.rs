//! Batch inference: a BatchJob (or Bedrock CreateModelInvocationJob) over JSONL records in an
//! object store — planned into token-sized shards (`plan`), run record by record through the
//! router at batch priority (`client`), committed shard by shard and merged into Bedrock's output
//! files (`job`). The same pipeline runs in a `mantle-batch` worker pod and inside `mantle dev`.

pub mod client;
pub mod cluster;
pub mod control;
pub mod job;
pub mod lifecycle;
pub mod metrics;
pub mod plan;
pub mod record;
pub mod reuse;
pub mod schema;
pub mod status;
pub mod store;

pub use client::{BATCH_TOKEN_HEADER, RouterClient};
pub use job::{Job, JobError, Outcome, Progress, Runtime, Worker, run};
pub use store::Stores;
