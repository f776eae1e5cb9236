//! Tenants and their keys: who a request belongs to, how much it may send, how urgent it is.
//!
//! The keys file (a local file, or the `keys.yaml` entry of a Kubernetes Secret mounted into the
//! router pod, which the kubelet keeps current) maps AWS access keys (SigV4) and bearer API keys
//! to tenants:
//!
//! ```yaml
//! tenants:
//!   - name: analytics
//!     priority: NORMAL            # CRITICAL | HIGH | NORMAL | LOW
//!     tokensPerMinute: 200000     # input + expected output tokens
//!     burstTokens: 50000
//!     accessKeys:
//!       - accessKeyId: AKIAMANTLEANALYTICS
//!         secretAccessKey: "…"
//!     apiKeys: ["mk-analytics-…"]
//! ```

use std::collections::HashMap;
use std::path::Path;

use mantle_admission::{Priority, TenantLimits};
use serde::Deserialize;

/// The default limits of a tenant the keys file does not bound.
pub const DEFAULT_TOKENS_PER_MINUTE: u64 = 1_000_000;
/// The limit of callers when authentication is off.
pub const UNBOUNDED_TOKENS_PER_MINUTE: u64 = 1_000_000_000_000;
pub const DEFAULT_BURST_TOKENS: u64 = 200_000;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    tenants: Vec<TenantEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TenantEntry {
    name: String,
    #[serde(default)]
    priority: PriorityName,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    burst_tokens: Option<u64>,
    #[serde(default)]
    access_keys: Vec<AccessKey>,
    #[serde(default)]
    api_keys: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AccessKey {
    access_key_id: String,
    secret_access_key: String,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum PriorityName {
    Critical,
    High,
    #[default]
    Normal,
    Low,
}

impl From<PriorityName> for Priority {
    fn from(p: PriorityName) -> Self {
        match p {
            PriorityName::Critical => Priority::Critical,
            PriorityName::High => Priority::High,
            PriorityName::Normal => Priority::Normal,
            PriorityName::Low => Priority::Low,
        }
    }
}

/// A caller, once authenticated.
#[derive(Clone, Debug)]
pub struct Tenant {
    pub name: String,
    pub priority: Priority,
    pub tokens_per_minute: u64,
    pub burst_tokens: u64,
}

impl Tenant {
    /// A caller when authentication is off: no practical token limit (fair queuing between
    /// callers still applies).
    pub fn unbounded(name: impl Into<String>) -> Self {
        Tenant {
            name: name.into(),
            priority: Priority::Normal,
            tokens_per_minute: UNBOUNDED_TOKENS_PER_MINUTE,
            burst_tokens: UNBOUNDED_TOKENS_PER_MINUTE,
        }
    }

    /// The tenant's limits on one model; `weight` is its provisioned model units there (1 if none)
    /// and `reserved` the tokens per minute those units guarantee.
    pub fn limits(&self, weight: f64, reserved: u64) -> TenantLimits {
        TenantLimits {
            tokens_per_minute: self.tokens_per_minute,
            burst_tokens: self.burst_tokens,
            priority: self.priority,
            weight,
            reserved_tokens_per_minute: reserved,
        }
    }
}

/// The keys file, indexed.
#[derive(Default)]
pub struct KeyStore {
    /// Access key id → (secret, tenant index).
    access_keys: HashMap<String, (String, usize)>,
    api_keys: HashMap<String, usize>,
    tenants: Vec<Tenant>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl KeyStore {
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| KeysError::Io { path: path.display().to_string(), source })?;
        Self::parse(&text).map_err(|message| KeysError::Invalid { path: path.display().to_string(), message })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: KeysFile = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        let mut store = KeyStore::default();
        for (index, t) in file.tenants.into_iter().enumerate() {
            if t.name.is_empty() {
                return Err(format!("tenants[{index}].name is empty"));
            }
            // Caches, buckets and reservations are keyed by the name: two tenants must not share one.
            if store.tenants.iter().any(|known| known.name == t.name) {
                return Err(format!("tenants[{index}]: the name {:?} is used twice", t.name));
            }
            for key in t.access_keys {
                if store.access_keys.insert(key.access_key_id.clone(), (key.secret_access_key, index)).is_some() {
                    return Err(format!("access key {} is listed twice", key.access_key_id));
                }
            }
            for key in t.api_keys {
                if key.len() < 16 {
                    return Err(format!("tenants[{index}] ({}): API keys must be at least 16 characters", t.name));
                }
                if store.api_keys.insert(key, index).is_some() {
                    return Err(format!("tenants[{index}] ({}): an API key is listed twice", t.name));
                }
            }
            store.tenants.push(Tenant {
                name: t.name,
                priority: t.priority.into(),
                tokens_per_minute: t.tokens_per_minute.unwrap_or(DEFAULT_TOKENS_PER_MINUTE),
                burst_tokens: t.burst_tokens.unwrap_or(DEFAULT_BURST_TOKENS),
            });
        }
        Ok(store)
    }

    /// The secret and tenant of an access key id.
    pub fn access_key(&self, access_key_id: &str) -> Option<(&str, &Tenant)> {
        let (secret, index) = self.access_keys.get(access_key_id)?;
        Some((secret, &self.tenants[*index]))
    }

    /// The tenant of a bearer API key.
    pub fn api_key(&self, key: &str) -> Option<&Tenant> {
        self.api_keys.get(key).map(|i| &self.tenants[*i])
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = r#"
tenants:
  - name: analytics
    priority: HIGH
    tokensPerMinute: 1000
    accessKeys:
      - { accessKeyId: AKIDANALYTICS, secretAccessKey: s3cret }
    apiKeys: ["mk-analytics-0123456789"]
  - name: web
"#;

    #[test]
    fn keys_map_to_tenants_with_limits() {
        let store = KeyStore::parse(KEYS).unwrap();
        let (secret, tenant) = store.access_key("AKIDANALYTICS").unwrap();
        assert_eq!((secret, tenant.name.as_str(), tenant.tokens_per_minute), ("s3cret", "analytics", 1000));
        assert_eq!(tenant.priority, Priority::High);
        assert_eq!(store.api_key("mk-analytics-0123456789").map(|t| t.name.as_str()), Some("analytics"));
        assert!(store.api_key("nope").is_none() && store.access_key("AKIDOTHER").is_none());
        assert_eq!(store.tenant_count(), 2);
    }

    #[test]
    fn bad_keys_files_are_refused_with_the_reason() {
        for (text, want) in [
            ("tenants: [{name: a, apiKeys: [short]}]", "at least 16"),
            ("tenants: [{name: a, colour: red}]", "unknown field"),
            ("tenants: [{name: a, priority: URGENT}]", "unknown variant"),
            (
                "tenants: [{name: a, accessKeys: [{accessKeyId: K, secretAccessKey: s}]}, {name: b, accessKeys: [{accessKeyId: K, secretAccessKey: t}]}]",
                "listed twice",
            ),
            ("tenants: [{name: ''}]", "empty"),
            ("{{{", ""),
        ] {
            let err = KeyStore::parse(text).err().unwrap_or_default();
            assert!(!err.is_empty() && err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn two_tenants_may_not_share_a_name() {
        let text = "tenants:\n  - {name: acme, apiKeys: [mk-acme-0123456789abcdef]}\n  - {name: acme, apiKeys: [mk-other-0123456789abcd]}\n";
        let error = KeyStore::parse(text).err().expect("refused");
        assert!(error.contains("\"acme\" is used twice"), "{error}");
    }
}
