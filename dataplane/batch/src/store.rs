//! Where a job's `s3://`, `gs://`, `az://` or `file://` URIs lead: object_store clients, with
//! credentials from the usual environment variables (`AWS_*`, mounted from the job's Secret in a
//! cluster), an S3 endpoint override, or a local directory standing in for a bucket
//! (`mantle dev --s3-endpoint URL` / `--bucket NAME=DIR`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{uri:?} is not a storage URI: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("cannot open {uri}: {source}")]
    Open { uri: String, source: object_store::Error },
}

/// How URIs map to stores.
#[derive(Clone, Debug, Default)]
pub struct Stores {
    /// An S3-compatible endpoint for every `s3://` bucket (moto, MinIO, LocalStack).
    pub s3_endpoint: Option<String>,
    /// Buckets served from local directories instead.
    pub buckets: BTreeMap<String, PathBuf>,
    /// Refuse `s3://` buckets that neither map to a directory nor go to `s3_endpoint` (under
    /// `mantle dev`, which never reaches for real AWS by surprise).
    pub mapped_only: bool,
}

/// A store and a prefix in it.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// The URI it came from (for messages).
    pub uri: String,
}

impl Location {
    /// A path below the prefix (`parts` joined with `/`).
    pub fn child(&self, rel: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    /// The location of a sub-prefix.
    pub fn sub(&self, rel: &str) -> Location {
        Location {
            store: self.store.clone(),
            prefix: self.child(rel),
            uri: format!("{}/{}", self.uri.trim_end_matches('/'), rel.trim_matches('/')),
        }
    }

    /// `path` relative to the prefix.
    pub fn relative(&self, path: &Path) -> String {
        match path.prefix_match(&self.prefix) {
            Some(parts) => parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"),
            None => path.to_string(),
        }
    }
}

impl Stores {
    /// Parses `NAME=DIR` (the `--bucket` flag).
    pub fn parse_bucket(spec: &str) -> Result<(String, PathBuf), String> {
        let (name, dir) = spec.split_once('=').ok_or_else(|| format!("{spec:?} is not NAME=DIR"))?;
        if name.is_empty() || dir.is_empty() {
            return Err(format!("{spec:?} is not NAME=DIR"));
        }
        Ok((name.to_string(), PathBuf::from(dir)))
    }

    /// What `--s3-endpoint` sets on an S3 client, as object_store configuration keys (shared
    /// with the control table's client, which is of delta-rs's object_store release).
    pub fn s3_settings(&self) -> Vec<(&'static str, String)> {
        let Some(endpoint) = &self.s3_endpoint else { return Vec::new() };
        let mut settings = vec![
            ("aws_endpoint", endpoint.clone()),
            ("aws_allow_http", endpoint.starts_with("http://").to_string()),
            ("aws_virtual_hosted_style_request", "false".to_string()),
        ];
        if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
            settings.push(("aws_region", "us-east-1".to_string()));
        }
        settings
    }

    pub fn open(&self, uri: &str) -> Result<Location, StoreError> {
        let bad = |reason: &str| StoreError::BadUri { uri: uri.to_string(), reason: reason.to_string() };
        let url = Url::parse(uri).map_err(|e| bad(&e.to_string()))?;
        let open = |source| StoreError::Open { uri: uri.to_string(), source };
        match url.scheme() {
            "file" => {
                let dir = url.to_file_path().map_err(|_| bad("not an absolute local path"))?;
                std::fs::create_dir_all(&dir).ok();
                let store = LocalFileSystem::new_with_prefix(&dir).map_err(open)?;
                Ok(Location { store: Arc::new(store), prefix: Path::default(), uri: uri.to_string() })
            }
            "s3" => {
                let bucket = url.host_str().ok_or_else(|| bad("no bucket"))?;
                let prefix = Path::parse(url.path().trim_matches('/')).map_err(|e| bad(&e.to_string()))?;
                if let Some(dir) = self.buckets.get(bucket) {
                    std::fs::create_dir_all(dir).ok();
                    let store = LocalFileSystem::new_with_prefix(dir).map_err(open)?;
                    return Ok(Location { store: Arc::new(store), prefix, uri: uri.to_string() });
                }
                if self.mapped_only && self.s3_endpoint.is_none() {
                    return Err(bad(&format!(
                        "bucket {bucket:?} is not mapped: give --bucket {bucket}=DIR or --s3-endpoint URL"
                    )));
                }
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
                for (key, value) in self.s3_settings() {
                    builder = builder.with_config(key.parse().map_err(open)?, value);
                }
                let store = builder.build().map_err(open)?;
                Ok(Location { store: Arc::new(store), prefix, uri: uri.to_string() })
            }
            "gs" | "az" | "abfs" | "abfss" => {
                let (store, prefix) = object_store::parse_url(&url).map_err(open)?;
                Ok(Location { store: Arc::from(store), prefix, uri: uri.to_string() })
            }
            other => Err(bad(&format!("scheme {other:?} is not one of s3, gs, az, file"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_bucket_is_a_local_directory_and_paths_nest_under_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores { buckets: [("lake".to_string(), dir.path().to_path_buf())].into(), ..Default::default() };
        let loc = stores.open("s3://lake/batch/2026/out/").unwrap();
        assert_eq!(loc.prefix.as_ref(), "batch/2026/out");
        assert_eq!(loc.child("job1/a.jsonl.out").as_ref(), "batch/2026/out/job1/a.jsonl.out");
        assert_eq!(loc.relative(&loc.child("x/y.jsonl")), "x/y.jsonl");
        assert_eq!(loc.sub("job1").uri, "s3://lake/batch/2026/out/job1");
    }

    #[test]
    fn an_s3_endpoint_becomes_client_settings_that_object_store_knows() {
        assert!(Stores::default().s3_settings().is_empty());
        let stores = Stores { s3_endpoint: Some("http://127.0.0.1:9000".into()), ..Default::default() };
        let settings = stores.s3_settings();
        assert!(settings.contains(&("aws_endpoint", "http://127.0.0.1:9000".into())));
        assert!(settings.contains(&("aws_allow_http", "true".into())));
        for (key, _) in settings {
            assert!(key.parse::<object_store::aws::AmazonS3ConfigKey>().is_ok(), "{key}");
        }
    }

    #[test]
    fn bad_uris_are_refused_with_a_reason() {
        let stores = Stores::default();
        for (uri, want) in [("http://x/y", "scheme"), ("not a uri", "not a storage URI"), ("s3:///x", "no bucket")] {
            let err = stores.open(uri).unwrap_err().to_string();
            assert!(err.contains(want), "{uri}: {err}");
        }
        let dev = Stores { mapped_only: true, ..Default::default() };
        let err = dev.open("s3://lake/x/").unwrap_err().to_string();
        assert!(err.contains("--bucket lake=DIR"), "{err}");
        assert!(Stores::parse_bucket("lake=/tmp/x").is_ok());
        assert!(Stores::parse_bucket("lake").is_err());
        assert!(Stores::parse_bucket("=/tmp").is_err());
    }
}
