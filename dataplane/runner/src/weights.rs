//! The weight cache tiers a runner loads through:
//!   L4 object store (s3://, gs://, az://, https://, file://, pvc://) — the source of truth;
//!   L3 node-local directory, content-addressed by SHA-256 (`blobs/<sha256>`), each copy verified
//!      before it is published by an atomic rename, copies evicted to stay within a byte budget:
//!      least recently used first, weighted by priority (`meta/<sha256>.priority`: a copy of
//!      priority p ages 1 + p times slower, so a reserved tenant's or a prewarmed model's weights
//!      outlast on-demand ones);
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
    /// The eviction priority this process gives what it fetches.
    priority: u8,
}

/// What eviction knows of one cached blob.
#[derive(Debug, Clone)]
pub struct BlobUse {
    pub name: String,
    pub bytes: u64,
    pub used: SystemTime,
    pub priority: u8,
}

impl NodeCache {
    pub fn new(root: impl Into<PathBuf>, budget_bytes: u64) -> Self {
        Self { root: root.into(), budget_bytes, priority: 0 }
    }

    /// Gives what this cache fetches or finds eviction priority `priority` (kept if higher).
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    fn meta(&self) -> PathBuf {
        self.root.join("meta")
    }

    /// A blob's eviction priority (0 when none was given).
    pub fn priority_of(&self, sha256: &str) -> u8 {
        std::fs::read_to_string(self.meta().join(format!("{sha256}.priority")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Records this cache's priority for a blob unless it already has a higher one.
    fn mark_priority(&self, sha256: &str) -> Result<(), WeightError> {
        if self.priority == 0 || self.priority_of(sha256) >= self.priority {
            return Ok(());
        }
        let meta = self.meta();
        std::fs::create_dir_all(&meta).map_err(io(&meta))?;
        let path = meta.join(format!("{sha256}.priority"));
        let staging = meta.join(format!(".{sha256}.{}-{}", std::process::id(), unique()));
        std::fs::write(&staging, self.priority.to_string()).map_err(io(&staging))?;
        std::fs::rename(&staging, &path).map_err(io(&path))
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
            self.mark_priority(sha)?;
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
        self.mark_priority(&sha256)?;
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
            let name = entry.file_name().to_string_lossy().to_string();
            let used = entry.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            let priority = self.priority_of(&name);
            entries.push(BlobUse { bytes: size_of_path(&path), name, used, priority });
        }
        let evict = eviction_plan(&entries, self.budget_bytes, keep, SystemTime::now());
        for name in &evict {
            let path = blobs.join(name);
            if path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            } else {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
            let _ = std::fs::remove_file(self.meta().join(format!("{name}.priority")));
            tracing::info!(blob = %name, "evicted from the node weight cache");
        }
        Ok(evict)
    }

    /// Keeps `uri` in the cache for good: fetches it now and every `interval` after (which also
    /// marks it used, and fetches it again should it have been evicted), setting `ready` while a
    /// verified copy is in place. What the prewarm DaemonSet's pods run; never returns.
    pub async fn keep(
        &self,
        uri: &str,
        expected_sha256: Option<&str>,
        options: &[(String, String)],
        interval: std::time::Duration,
        ready: &std::sync::atomic::AtomicBool,
    ) {
        loop {
            match self.fetch(uri, expected_sha256, options).await {
                Ok(cached) => {
                    if !ready.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        tracing::info!(tier = cached.tier.name(), seconds = cached.seconds, sha256 = %cached.sha256, "weights cached on this node");
                    }
                }
                Err(e) => {
                    ready.store(false, std::sync::atomic::Ordering::Release);
                    tracing::warn!(error = %e, uri, "keeping the weights in the node cache");
                }
            }
            tokio::time::sleep(interval).await;
        }
    }
}

/// Which blobs to remove so the rest fit `budget`, `keep` never: least recently used first, a
/// blob of priority p counting as used p + 1 times more recently than it was (its age at `now`
/// divided by 1 + p).
pub fn eviction_plan(entries: &[BlobUse], budget: u64, keep: &str, now: SystemTime) -> Vec<String> {
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let age =
        |e: &BlobUse| now.duration_since(e.used).unwrap_or_default().as_secs_f64() / (1.0 + f64::from(e.priority));
    let mut by_age: Vec<&BlobUse> = entries.iter().filter(|e| e.name != keep).collect();
    by_age.sort_by(|a, b| age(b).total_cmp(&age(a)).then_with(|| a.name.cmp(&b.name)));
    let mut evict = Vec::new();
    for e in by_age {
        if total <= budget {
            break;
        }
        total -= e.bytes;
        evict.push(e.name.clone());
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

    fn blob(name: &str, used: u64, priority: u8) -> BlobUse {
        BlobUse { name: name.into(), bytes: 40, used: SystemTime::UNIX_EPOCH + Duration::from_secs(used), priority }
    }

    #[test]
    fn eviction_removes_least_recently_used_blobs_until_within_budget() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        let entries = vec![blob("a", 3, 0), blob("b", 1, 0), blob("c", 2, 0), blob("new", 0, 0)];
        assert_eq!(eviction_plan(&entries, 100, "new", now), vec!["b", "c"], "oldest first, never the new one");
        assert!(eviction_plan(&entries, 160, "new", now).is_empty());
        assert_eq!(eviction_plan(&entries, 0, "new", now), vec!["b", "c", "a"], "the kept blob stays even over budget");
    }

    #[test]
    fn a_higher_priority_blob_outlasts_more_recently_used_ones() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        // Age 90 at priority 2 counts as 30: younger than the on-demand blobs aged 40 and 50.
        let entries = vec![blob("reserved", 10, 2), blob("a", 60, 0), blob("b", 50, 0), blob("new", 100, 0)];
        assert_eq!(eviction_plan(&entries, 80, "new", now), vec!["b", "a"]);
        // Older still (age 100, counts as 33), it goes before the on-demand blob aged 20.
        let entries = vec![blob("reserved", 0, 2), blob("a", 80, 0), blob("new", 100, 0)];
        assert_eq!(eviction_plan(&entries, 80, "new", now), vec!["reserved"]);
    }

    #[tokio::test]
    async fn priorities_are_recorded_kept_at_their_highest_and_removed_with_the_blob() {
        let root = std::env::temp_dir().join(format!("mantle-priority-{}-{}", std::process::id(), unique()));
        let source = root.join("w.bin");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(&source, b"weights").unwrap();
        let uri = format!("file://{}", source.display());
        let cached = NodeCache::new(root.join("cache"), 1 << 20).with_priority(2).fetch(&uri, None, &[]).await.unwrap();
        let low = NodeCache::new(root.join("cache"), 1 << 20).with_priority(1);
        low.fetch(&uri, Some(&cached.sha256), &[]).await.unwrap();
        assert_eq!(low.priority_of(&cached.sha256), 2, "a lower priority does not lower it");
        // A budget of zero evicts it for the next blob.
        std::fs::write(&source, b"other weights").unwrap();
        NodeCache::new(root.join("cache"), 0).fetch(&uri, None, &[]).await.unwrap();
        assert_eq!(low.priority_of(&cached.sha256), 0);
        assert!(!root.join("cache/blobs").join(&cached.sha256).exists());
        std::fs::remove_dir_all(root).ok();
    }
}
