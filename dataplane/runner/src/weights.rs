//! The weight cache tiers a runner loads through:
//!   L4 object store (s3://, gs://, az://, https://, file://, pvc://) — the source of truth;
//!   L3 node-local directory, content-addressed by SHA-256 (`blobs/<sha256>`), each copy verified
//!      before it is published by an atomic rename, least recently used copies evicted to stay
//!      within a byte budget;
//!   L2 host memory (the engine memory-maps the L3 copy);
//!   L1 device memory (GPU builds).
//! `mantle-runner fetch` fills L3 from L4; the operator runs it as the runner pod's init container.
//!
//! A directory source (a URI ending in `/`, such as a safetensors model) is stored as one
//! directory blob whose address is the SHA-256 of its manifest: one `<name> <sha256>` line per file,
//! sorted by name.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

/// Why weights could not be fetched into, or kept in, the node cache. A variant with a cause keeps
/// it as its source (the binary prints the chain) rather than repeating it in its message.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("weights URI {uri:?}: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("object store")]
    Store(#[from] object_store::Error),
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("sha256 mismatch for {uri}: expected {expected}, downloaded {actual}; the download was discarded")]
    Sha256Mismatch { uri: String, expected: String, actual: String },
    #[error("{uri} holds no objects")]
    Empty { uri: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WeightError + '_ {
    move |source| WeightError::Io { path: path.to_path_buf(), source }
}

/// Which tier a load was served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    ObjectStore,
    NodeDisk,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::ObjectStore => "object_store",
            Tier::NodeDisk => "node_disk",
        }
    }
}

/// Weights in the node cache, ready to load.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The file (GGUF) or directory (safetensors) to load.
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    /// Where they came from this time, and how long that took.
    pub tier: Tier,
    pub seconds: f64,
}

/// The L3 tier: a directory of content-addressed blobs under a byte budget.
pub struct NodeCache {
    root: PathBuf,
    budget_bytes: u64,
}

impl NodeCache {
    pub fn new(root: impl Into<PathBuf>, budget_bytes: u64) -> Self {
        Self { root: root.into(), budget_bytes }
    }

    /// The cache's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// Returns the cached copy of `uri`, filling it from the object store when missing.
    /// With `expected_sha256`, a copy is used only if its address matches, and a download that
    /// does not match is refused while any previous good copy stays in place. Without it, the
    /// object is downloaded to learn its digest (a FoundationModel should name one). `options` configure
    /// the store (`aws_endpoint`, `aws_access_key_id`, …; see [`store_options_from_env`]).
    pub async fn fetch(
        &self,
        uri: &str,
        expected_sha256: Option<&str>,
        options: &[(String, String)],
    ) -> Result<Cached, WeightError> {
        let started = Instant::now();
        if let Some(sha) = expected_sha256
            && let Some(path) = self.lookup(sha)
        {
            return Ok(Cached {
                bytes: size_of_path(&path),
                path,
                sha256: sha.to_string(),
                tier: Tier::NodeDisk,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        let (store, location, is_dir) = open(uri, options)?;
        let tmp = self.root.join("tmp");
        tokio::fs::create_dir_all(&tmp).await.map_err(io(&tmp))?;
        tokio::fs::create_dir_all(self.blobs()).await.map_err(io(&self.blobs()))?;
        let staging = tmp.join(format!("{}-{}", std::process::id(), unique()));
        let result = if is_dir {
            download_dir(store.as_ref(), &location, &staging, uri).await
        } else {
            download_file(store.as_ref(), &location, &staging).await
        };
        let (sha256, bytes) = match result {
            Ok(v) => v,
            Err(e) => {
                remove_path(&staging).await;
                return Err(e);
            }
        };
        if let Some(expected) = expected_sha256
            && expected != sha256
        {
            remove_path(&staging).await;
            return Err(WeightError::Sha256Mismatch {
                uri: uri.to_string(),
                expected: expected.to_string(),
                actual: sha256,
            });
        }
        let target = self.blobs().join(&sha256);
        if tokio::fs::metadata(&target).await.is_ok() {
            remove_path(&staging).await;
        } else {
            tokio::fs::rename(&staging, &target).await.map_err(io(&target))?;
        }
        self.evict_beyond_budget(&sha256)?;
        Ok(Cached { path: target, sha256, bytes, tier: Tier::ObjectStore, seconds: started.elapsed().as_secs_f64() })
    }

    /// The path of a cached blob (a file, or a directory for directory sources), marked as just
    /// used for eviction.
    pub fn lookup(&self, sha256: &str) -> Option<PathBuf> {
        let blob = self.blobs().join(sha256);
        std::fs::metadata(&blob).ok()?;
        // Best effort: a blob whose time cannot be updated is merely evicted earlier.
        let _ = std::fs::File::open(&blob).and_then(|f| f.set_modified(SystemTime::now()));
        Some(blob)
    }

    /// Removes least recently used blobs (never `keep`) until the cache fits its budget.
    fn evict_beyond_budget(&self, keep: &str) -> Result<Vec<String>, WeightError> {
        let blobs = self.blobs();
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&blobs).map_err(io(&blobs))?.flatten() {
            let path = entry.path();
            let used = entry.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            entries.push((entry.file_name().to_string_lossy().to_string(), size_of_path(&path), used));
        }
        let evict = eviction_plan(&entries, self.budget_bytes, keep);
        for name in &evict {
            let path = blobs.join(name);
            if path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            } else {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
            tracing::info!(blob = %name, "evicted from the node weight cache");
        }
        Ok(evict)
    }
}

/// Which blobs to remove, oldest use first, so the rest fit `budget`; `keep` is never removed.
pub fn eviction_plan(entries: &[(String, u64, SystemTime)], budget: u64, keep: &str) -> Vec<String> {
    let mut total: u64 = entries.iter().map(|e| e.1).sum();
    let mut by_age: Vec<&(String, u64, SystemTime)> = entries.iter().filter(|e| e.0 != keep).collect();
    by_age.sort_by_key(|e| e.2);
    let mut evict = Vec::new();
    for (name, size, _) in by_age {
        if total <= budget {
            break;
        }
        total -= size;
        evict.push(name.clone());
    }
    evict
}

/// A number no other download in this process uses, for staging names.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

fn size_of_path(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path).map(|d| d.flatten().map(|e| size_of_path(&e.path())).sum()).unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

async fn remove_path(path: &Path) {
    if path.is_dir() {
        let _ = tokio::fs::remove_dir_all(path).await;
    } else {
        let _ = tokio::fs::remove_file(path).await;
    }
}

/// Store options from the environment: `AWS_*`, `GOOGLE_*` and `AZURE_*` variables, as the
/// object_store builders name them (credentials from a Secret arrive this way in a pod).
pub fn store_options_from_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_"))
        .collect()
}

/// The store and location of a weights URI.
/// `pvc://<claim>/<path>` is the claim mounted at `$MANTLE_PVC_ROOT/<claim>` (default `/mnt/pvc`).
fn open(uri: &str, options: &[(String, String)]) -> Result<(Box<dyn ObjectStore>, StorePath, bool), WeightError> {
    let bad = |reason: String| WeightError::BadUri { uri: uri.to_string(), reason };
    let is_dir = uri.ends_with('/');
    let resolved = match uri.strip_prefix("pvc://") {
        Some(rest) => {
            let root = std::env::var("MANTLE_PVC_ROOT").unwrap_or_else(|_| "/mnt/pvc".into());
            format!("file://{}/{}", root.trim_end_matches('/'), rest)
        }
        None => uri.to_string(),
    };
    let url = url::Url::parse(&resolved).map_err(|e| bad(e.to_string()))?;
    let options = options.iter().map(|(k, v)| (k.as_str(), v.clone()));
    let (store, path) = object_store::parse_url_opts(&url, options).map_err(|e| bad(e.to_string()))?;
    Ok((store, path, is_dir))
}

/// Streams one object into `dest`, hashing as it goes.
async fn download_file(
    store: &dyn ObjectStore,
    location: &StorePath,
    dest: &Path,
) -> Result<(String, u64), WeightError> {
    let mut stream = store.get(location).await?.into_stream();
    let mut file = tokio::fs::File::create(dest).await.map_err(io(dest))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(io(dest))?;
    }
    file.sync_all().await.map_err(io(dest))?;
    Ok((hex(&hasher.finalize()), bytes))
}

/// Downloads every object under a prefix into directory `dest`; the address is the SHA-256 of
/// the manifest.
async fn download_dir(
    store: &dyn ObjectStore,
    prefix: &StorePath,
    dest: &Path,
    uri: &str,
) -> Result<(String, u64), WeightError> {
    tokio::fs::create_dir_all(dest).await.map_err(io(dest))?;
    let mut objects = Vec::new();
    let mut listing = store.list(Some(prefix));
    while let Some(meta) = listing.next().await {
        objects.push(meta?.location);
    }
    if objects.is_empty() {
        return Err(WeightError::Empty { uri: uri.to_string() });
    }
    let mut manifest = Vec::new();
    let mut total = 0;
    for location in objects {
        let name = location
            .as_ref()
            .strip_prefix(prefix.as_ref())
            .unwrap_or(location.as_ref())
            .trim_start_matches('/')
            .to_string();
        if name.is_empty() || name.contains('/') {
            continue; // only the files directly under the prefix
        }
        let (sha, bytes) = download_file(store, &location, &dest.join(&name)).await?;
        total += bytes;
        manifest.push(format!("{name} {sha}\n"));
    }
    manifest.sort();
    Ok((hex(&Sha256::digest(manifest.concat().as_bytes())), total))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn eviction_removes_least_recently_used_blobs_until_within_budget() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let entries = vec![
            ("a".to_string(), 40, t(3)),
            ("b".to_string(), 40, t(1)),
            ("c".to_string(), 40, t(2)),
            ("new".to_string(), 40, t(0)),
        ];
        assert_eq!(eviction_plan(&entries, 100, "new"), vec!["b", "c"], "oldest first, never the new one");
        assert!(eviction_plan(&entries, 160, "new").is_empty());
        assert_eq!(eviction_plan(&entries, 0, "new"), vec!["b", "c", "a"], "the kept blob stays even over budget");
    }
}
