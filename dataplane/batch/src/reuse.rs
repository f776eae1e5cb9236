//! Outputs that stand for records again: a record whose content (recordId, modelInput, the model
//! and the job's inference settings) has not changed since an earlier job (`reuseFrom`) gets that
//! job's output line instead of a new inference; a rerun (`spec.rerun`) infers again only the
//! records it selects and keeps every other record's line.
//!
//! Each committed shard has an index beside its lines (`_mantle/shards/<id>.index.jsonl`), one
//! entry per output line: the record's content hash, whether the line is a success, its
//! partition, its id and its tokens.

use std::collections::HashMap;

use bytes::Bytes;
use mantle_crds::{BatchJobSpec, Rerun};
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::job::{JobError, StoredPlan, shard_name};
use crate::store::Location;

/// One output line, as the index knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The content hash (hex), empty for a line that was not a record.
    #[serde(rename = "h")]
    pub hash: String,
    pub ok: bool,
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    #[serde(rename = "id")]
    pub record_id: String,
    #[serde(rename = "ti", default)]
    pub input_tokens: u64,
    #[serde(rename = "to", default)]
    pub output_tokens: u64,
}

/// What, besides a record itself, decides its output: the model, how it is invoked, the
/// inference defaults and the output schema.
pub fn job_salt(spec: &BatchJobSpec) -> Vec<u8> {
    serde_json::to_vec(&(
        &spec.model_id,
        spec.invocation_type,
        &spec.inference_config,
        &spec.output_schema,
        &spec.input_token_limit,
    ))
    .expect("serialises")
}

/// A record's content hash: 128 bits of SHA-256, as hex.
pub fn content_hash(salt: &[u8], record_id: &str, model_input: &RawValue) -> String {
    let digest = Sha256::new()
        .chain_update((salt.len() as u64).to_le_bytes())
        .chain_update(salt)
        .chain_update((record_id.len() as u64).to_le_bytes())
        .chain_update(record_id.as_bytes())
        .chain_update(model_input.get().as_bytes())
        .finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a rerun infers this record again.
pub fn selected(rerun: &Rerun, entry: &IndexEntry) -> bool {
    (rerun.failed && !entry.ok)
        || rerun.partition.as_ref().is_some_and(|p| entry.partition.as_ref() == Some(p))
        || rerun.record_id_hash_prefix.as_ref().is_some_and(|prefix| {
            let digest = Sha256::digest(entry.record_id.as_bytes());
            let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
            hex.starts_with(prefix.as_str())
        })
}

fn index_path(loc: &Location, shard: u32) -> object_store::path::Path {
    loc.child(&format!("_mantle/shards/{}.index.jsonl", shard_name(shard)))
}

pub fn render_index(entries: &[IndexEntry]) -> Bytes {
    let mut text = String::new();
    for e in entries {
        text.push_str(&serde_json::to_string(e).expect("serialises"));
        text.push('\n');
    }
    Bytes::from(text)
}

pub async fn write_index(loc: &Location, shard: u32, entries: &[IndexEntry]) -> Result<(), JobError> {
    crate::job::put(loc, &index_path(loc, shard), render_index(entries)).await
}

async fn read(loc: &Location, path: &object_store::path::Path) -> Result<Option<Bytes>, JobError> {
    match loc.store.get(path).await {
        Ok(got) => Ok(Some(got.bytes().await.map_err(|source| JobError::Read { uri: path.to_string(), source })?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(source) => Err(JobError::Read { uri: path.to_string(), source }),
    }
}

/// A committed shard's index (`None` when it has none).
pub async fn read_index(loc: &Location, shard: u32) -> Result<Option<Vec<IndexEntry>>, JobError> {
    let Some(bytes) = read(loc, &index_path(loc, shard)).await? else { return Ok(None) };
    let entries = bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(serde_json::from_slice)
        .collect::<Result<Vec<IndexEntry>, _>>()
        .map_err(|e| JobError::Invalid(format!("the index of shard {shard} in {} is damaged: {e}", loc.uri)))?;
    Ok(Some(entries))
}

/// A committed shard's output lines (each with its newline).
pub async fn read_lines(loc: &Location, shard: u32) -> Result<Vec<Bytes>, JobError> {
    let path = loc.child(&format!("_mantle/shards/{}.jsonl", shard_name(shard)));
    let bytes = read(loc, &path).await?.unwrap_or_default();
    let mut lines = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let end = bytes[start..].iter().position(|&b| b == b'\n').map_or(bytes.len(), |i| start + i + 1);
        lines.push(bytes.slice(start..end));
        start = end;
    }
    Ok(lines)
}

/// An earlier job's successful outputs, by content hash.
pub struct Previous {
    pub loc: Location,
    by_hash: HashMap<u128, (u32, u32)>,
}

impl Previous {
    /// Reads the index of every committed shard of the job at `loc` (its output folder).
    pub async fn load(loc: Location) -> Result<Previous, JobError> {
        let plan_path = loc.child("_mantle/plan.json");
        let plan: StoredPlan = match read(&loc, &plan_path).await? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| JobError::Invalid(format!("the plan of {} is damaged: {e}", loc.uri)))?,
            None => return Err(JobError::Invalid(format!("{} holds no batch job outputs to reuse", loc.uri))),
        };
        let mut by_hash = HashMap::new();
        for shard in &plan.shards {
            for (line, entry) in read_index(&loc, shard.id).await?.unwrap_or_default().iter().enumerate() {
                if entry.ok
                    && let Ok(hash) = u128::from_str_radix(&entry.hash, 16)
                {
                    by_hash.insert(hash, (shard.id, line as u32));
                }
            }
        }
        tracing::info!(from = %loc.uri, records = by_hash.len(), "outputs to reuse");
        Ok(Previous { loc, by_hash })
    }

    /// Where the output of a record with this content hash is (shard, line).
    pub fn find(&self, hash: &str) -> Option<(u32, u32)> {
        self.by_hash.get(&u128::from_str_radix(hash, 16).ok()?).copied()
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ok: bool, partition: Option<&str>, id: &str) -> IndexEntry {
        IndexEntry {
            hash: "00".into(),
            ok,
            partition: partition.map(str::to_string),
            record_id: id.into(),
            input_tokens: 0,
            output_tokens: 0,
        }
    }

    #[test]
    fn a_rerun_selects_failed_records_a_partition_or_a_hash_prefix() {
        let rerun = |failed, partition: Option<&str>, prefix: Option<&str>| Rerun {
            id: "r2".into(),
            failed,
            partition: partition.map(str::to_string),
            record_id_hash_prefix: prefix.map(str::to_string),
        };
        assert!(selected(&rerun(true, None, None), &entry(false, None, "a")));
        assert!(!selected(&rerun(true, None, None), &entry(true, None, "a")));
        assert!(selected(&rerun(false, Some("C1"), None), &entry(true, Some("C1"), "a")));
        assert!(!selected(&rerun(false, Some("C1"), None), &entry(true, Some("C2"), "a")));
        // sha256("a") = ca978112…
        assert!(selected(&rerun(false, None, Some("ca9")), &entry(true, None, "a")));
        assert!(!selected(&rerun(false, None, Some("cb")), &entry(true, None, "a")));
        // About a sixteenth of ids start with any one hex digit.
        let hits = (0..1600)
            .filter(|i| selected(&rerun(false, None, Some("7")), &entry(true, None, &format!("R{i}"))))
            .count();
        assert!((60..140).contains(&hits), "{hits}");
    }

    #[test]
    fn the_content_hash_covers_the_record_and_the_jobs_settings() {
        let spec = |model: &str| -> BatchJobSpec {
            serde_json::from_value(serde_json::json!({
                "modelId": model, "input": {"uri": "s3://b/i/"}, "output": {"uri": "s3://b/o/"}
            }))
            .unwrap()
        };
        let input = RawValue::from_string(r#"{"prompt":"hi"}"#.into()).unwrap();
        let other = RawValue::from_string(r#"{"prompt":"ho"}"#.into()).unwrap();
        let a = job_salt(&spec("m"));
        let h = content_hash(&a, "R1", &input);
        assert_eq!(h.len(), 32);
        assert_eq!(h, content_hash(&a, "R1", &input));
        assert_ne!(h, content_hash(&a, "R2", &input));
        assert_ne!(h, content_hash(&a, "R1", &other));
        assert_ne!(h, content_hash(&job_salt(&spec("n")), "R1", &input));
        let round: Vec<IndexEntry> = render_index(&[entry(true, Some("C\n1"), "R\"1")])
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(round, [entry(true, Some("C\n1"), "R\"1")]);
    }
}
