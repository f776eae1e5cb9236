//! Who is calling: SigV4 (the AWS SDKs, signing name `bedrock`) or a bearer API key (OpenAI
//! clients, and Bedrock's API keys), mapped to a tenant by the keys file. Any failure is a 403
//! AccessDeniedException. With authentication off (local mode only), every request is accepted
//! and named after the access key it was signed with, so per-tenant limits still apply.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use mantle_awswire::sigv4::{self, Secret};

use crate::error::ApiError;
use crate::tenants::{KeyStore, Tenant};

/// SigV4's allowed clock skew.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// The SigV4 signing name of every Bedrock API.
pub const SIGNING_NAME: &str = "bedrock";

#[derive(Clone)]
pub enum Auth {
    /// Accept everything (local mode).
    Off,
    /// Keys from a file (a mounted Secret), reloaded when it changes.
    Keys { path: PathBuf, store: Arc<RwLock<Arc<KeyStore>>> },
}

/// The parts of a request that authentication reads.
pub struct Signed<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: &'a [u8],
}

impl Auth {
    /// Loads the keys file and starts watching it for changes (the kubelet rewrites a mounted
    /// Secret in place).
    pub fn from_file(path: PathBuf) -> anyhow::Result<Self> {
        let store = Arc::new(RwLock::new(Arc::new(KeyStore::load(&path)?)));
        let auth = Auth::Keys { path: path.clone(), store: store.clone() };
        tokio::spawn(async move {
            let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut seen = modified(&path);
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let now = modified(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                match KeyStore::load(&path) {
                    Ok(keys) => {
                        tracing::info!(path = %path.display(), tenants = keys.tenant_count(), "keys reloaded");
                        *store.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the keys file changed but is invalid; keeping the previous keys")
                    }
                }
            }
        });
        Ok(auth)
    }

    /// Authenticates a request, returning its tenant.
    pub fn authenticate(&self, request: &Signed<'_>) -> Result<Tenant, ApiError> {
        let authorization =
            request.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("authorization")).map(|(_, v)| *v);
        let store = match self {
            Auth::Off => {
                let name = authorization
                    .and_then(|h| sigv4::parse_authorization(h).ok())
                    .map_or_else(|| "anonymous".to_string(), |a| a.credential.access_key_id);
                return Ok(Tenant::unbounded(name));
            }
            Auth::Keys { store, .. } => store.read().unwrap_or_else(|e| e.into_inner()).clone(),
        };
        let Some(authorization) = authorization else {
            return Err(ApiError::AccessDenied(
                "Missing authentication: sign the request with SigV4 (service bedrock) or send Authorization: Bearer <API key>.".into(),
            ));
        };
        if let Some(key) = authorization.strip_prefix("Bearer ") {
            return store
                .api_key(key.trim())
                .cloned()
                .ok_or_else(|| ApiError::AccessDenied("The API key is not valid.".into()));
        }
        let view = sigv4::Request {
            method: request.method,
            path: request.path,
            query: request.query,
            headers: &request.headers,
            body: request.body,
        };
        let lookup = |akid: &str| store.access_key(akid).map(|(secret, _)| Secret::new(secret));
        let identity = sigv4::verify(&view, lookup, SIGNING_NAME, SystemTime::now(), MAX_SKEW)
            .map_err(|e| ApiError::AccessDenied(e.to_string()))?;
        store
            .access_key(&identity.access_key_id)
            .map(|(_, tenant)| tenant.clone())
            .ok_or_else(|| ApiError::AccessDenied("The security token included in the request is invalid.".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = "tenants:\n  - name: acme\n    accessKeys: [{accessKeyId: AKIDACME, secretAccessKey: s3cret}]\n    apiKeys: [mk-acme-0123456789abcdef]\n";

    fn keys() -> Auth {
        Auth::Keys { path: PathBuf::new(), store: Arc::new(RwLock::new(Arc::new(KeyStore::parse(KEYS).unwrap()))) }
    }

    fn signed<'a>(headers: Vec<(&'a str, &'a str)>, body: &'a [u8]) -> Signed<'a> {
        Signed { method: "POST", path: "/model/a.b-v1%3A0/converse", query: "", headers, body }
    }

    fn sign(date: &str, body: &[u8]) -> String {
        let headers = [("host", "localhost:8080"), ("x-amz-date", date), ("content-type", "application/json")];
        let view =
            sigv4::Request { method: "POST", path: "/model/a.b-v1%3A0/converse", query: "", headers: &headers, body };
        sigv4::sign(&view, "AKIDACME", &Secret::new("s3cret"), "us-east-1", "bedrock").unwrap()
    }

    #[test]
    fn sigv4_and_api_keys_map_to_the_tenant() {
        let date = sigv4::amz_date(SystemTime::now());
        let authz = sign(&date, b"{}");
        let headers = vec![
            ("host", "localhost:8080"),
            ("x-amz-date", date.as_str()),
            ("content-type", "application/json"),
            ("authorization", authz.as_str()),
        ];
        assert_eq!(keys().authenticate(&signed(headers.clone(), b"{}")).unwrap().name, "acme");
        let tampered = keys().authenticate(&signed(headers, b"{\"x\":1}")).unwrap_err();
        assert_eq!(tampered.kind(), "AccessDeniedException");
        let bearer = vec![("authorization", "Bearer mk-acme-0123456789abcdef")];
        assert_eq!(keys().authenticate(&signed(bearer, b"")).unwrap().name, "acme");
    }

    #[test]
    fn missing_wrong_and_expired_credentials_are_denied() {
        let old = sigv4::amz_date(SystemTime::now() - Duration::from_secs(600));
        let authz = sign(&old, b"");
        let expired = vec![
            ("host", "localhost:8080"),
            ("x-amz-date", old.as_str()),
            ("content-type", "application/json"),
            ("authorization", authz.as_str()),
        ];
        for headers in [
            vec![],
            vec![("authorization", "Bearer nope")],
            vec![("authorization", "AWS4-HMAC-SHA256 garbage")],
            expired,
        ] {
            let err = keys().authenticate(&signed(headers.clone(), b"")).unwrap_err();
            assert_eq!(err.status(), axum::http::StatusCode::FORBIDDEN, "{headers:?}");
        }
    }

    #[test]
    fn with_auth_off_callers_are_named_by_their_access_key() {
        let date = sigv4::amz_date(SystemTime::now());
        let authz = sign(&date, b"");
        let tenant = Auth::Off.authenticate(&signed(vec![("authorization", authz.as_str())], b"")).unwrap();
        assert_eq!(tenant.name, "AKIDACME");
        assert_eq!(Auth::Off.authenticate(&signed(vec![], b"")).unwrap().name, "anonymous");
    }
}
