//! Who is calling: SigV4 (the AWS SDKs, signing name `bedrock`) or a bearer API key (OpenAI
//! clients, and Bedrock's API keys), mapped to a tenant by the keys file. Failures answer with
//! the exception AWS would (`MissingAuthenticationTokenException`, `UnrecognizedClientException`,
//! `InvalidSignatureException`, ...). Unsigned payloads are refused: Bedrock signs payloads, and a
//! captured request must not be replayable with another body. With authentication off (local mode only), every request is accepted
//! and named after the access key it was signed with, so per-tenant limits still apply.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
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
    pub fn from_file(path: PathBuf) -> Result<Self, crate::tenants::KeysError> {
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

    /// Everything authentication can decide from the headers alone, before a body byte is read:
    /// a bearer key is checked fully; a SigV4 signature's access key must exist, its date be in its
    /// window and its payload be signed (the signature itself covers the body's hash, so
    /// [`Pending::finish`] verifies it once the body is read).
    pub fn precheck(&self, request: &Signed<'_>) -> Result<Pending, ApiError> {
        let authorization =
            request.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("authorization")).map(|(_, v)| *v);
        let store = match self {
            Auth::Off => {
                let name = authorization
                    .and_then(|h| sigv4::parse_authorization(h).ok())
                    .map_or_else(|| "anonymous".to_string(), |a| a.credential.access_key_id);
                return Ok(Pending::Done(Tenant::unbounded(name)));
            }
            Auth::Keys { store, .. } => store.read().unwrap_or_else(|e| e.into_inner()).clone(),
        };
        if let Some(key) = authorization.and_then(|a| a.strip_prefix("Bearer ")) {
            return store.api_key(key.trim()).cloned().map(Pending::Done).ok_or_else(|| ApiError::Unauthenticated {
                code: "AccessDeniedException",
                status: StatusCode::FORBIDDEN,
                message: "The API key is not valid.".into(),
            });
        }
        let view = request.view();
        let checked =
            sigv4::precheck(&view, |akid| store.access_key(akid).is_some(), SIGNING_NAME, SystemTime::now(), MAX_SKEW)
                .map_err(sigv4_error)?;
        if !checked.payload_signed {
            return Err(ApiError::Unauthenticated {
                code: "InvalidSignatureException",
                status: StatusCode::FORBIDDEN,
                message: format!(
                    "x-amz-content-sha256: {} is not accepted: sign the payload (its SHA-256), as the AWS SDKs do for Bedrock.",
                    sigv4::UNSIGNED_PAYLOAD
                ),
            });
        }
        Ok(Pending::Verify { store })
    }

    /// Authenticates a whole request, returning its tenant.
    pub fn authenticate(&self, request: &Signed<'_>) -> Result<Tenant, ApiError> {
        self.precheck(request)?.finish(request)
    }
}

/// What [`Auth::precheck`] left to do once the body is read.
pub enum Pending {
    /// Nothing: the headers decided.
    Done(Tenant),
    /// Verify the SigV4 signature over the request with its body.
    Verify { store: Arc<KeyStore> },
}

impl Pending {
    pub fn finish(self, request: &Signed<'_>) -> Result<Tenant, ApiError> {
        let store = match self {
            Pending::Done(tenant) => return Ok(tenant),
            Pending::Verify { store } => store,
        };
        let lookup = |akid: &str| store.access_key(akid).map(|(secret, _)| Secret::new(secret));
        let identity =
            sigv4::verify(&request.view(), lookup, SIGNING_NAME, SystemTime::now(), MAX_SKEW).map_err(sigv4_error)?;
        store
            .access_key(&identity.access_key_id)
            .map(|(_, tenant)| tenant.clone())
            .ok_or_else(|| sigv4_error(sigv4::SigV4Error::UnknownAccessKey(identity.access_key_id)))
    }
}

impl<'a> Signed<'a> {
    fn view(&'a self) -> sigv4::Request<'a> {
        sigv4::Request {
            method: self.method,
            path: self.path,
            query: self.query,
            headers: &self.headers,
            body: self.body,
        }
    }
}

/// A SigV4 failure as AWS answers it: its own exception name and status.
fn sigv4_error(error: sigv4::SigV4Error) -> ApiError {
    ApiError::Unauthenticated {
        code: error.error_code(),
        status: StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::FORBIDDEN),
        message: match error {
            sigv4::SigV4Error::MissingAuthorization => "Missing Authentication Token: sign the request with SigV4 \
                 (service bedrock) or send Authorization: Bearer <API key>."
                .into(),
            // AWS's own wording, which the SDKs' users search for.
            sigv4::SigV4Error::UnknownAccessKey(_) => "The security token included in the request is invalid.".into(),
            other => other.to_string(),
        },
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
        sign_as("AKIDACME", "s3cret", date, body, &[])
    }

    fn sign_as(akid: &str, secret: &str, date: &str, body: &[u8], extra: &[(&str, &str)]) -> String {
        let mut headers = vec![("host", "localhost:8080"), ("x-amz-date", date), ("content-type", "application/json")];
        headers.extend_from_slice(extra);
        let view =
            sigv4::Request { method: "POST", path: "/model/a.b-v1%3A0/converse", query: "", headers: &headers, body };
        sigv4::sign(&view, akid, &Secret::new(secret), "us-east-1", "bedrock").unwrap()
    }

    fn signed_headers<'a>(date: &'a str, authz: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("host", "localhost:8080"),
            ("x-amz-date", date),
            ("content-type", "application/json"),
            ("authorization", authz),
        ]
    }

    #[test]
    fn failures_carry_the_exception_aws_answers_with() {
        let date = sigv4::amz_date(SystemTime::now());
        let code =
            |headers: Vec<(&str, &str)>, body: &[u8]| keys().authenticate(&signed(headers, body)).unwrap_err().kind();
        assert_eq!(code(vec![], b""), "MissingAuthenticationTokenException");
        let wrong_secret = sign_as("AKIDACME", "not-the-secret", &date, b"{}", &[]);
        assert_eq!(code(signed_headers(&date, &wrong_secret), b"{}"), "InvalidSignatureException");
        let unknown = sign_as("AKIDNOBODY", "s3cret", &date, b"{}", &[]);
        assert_eq!(code(signed_headers(&date, &unknown), b"{}"), "UnrecognizedClientException");
        assert_eq!(code(vec![("authorization", "Bearer nope")], b""), "AccessDeniedException");
    }

    #[test]
    fn an_unsigned_payload_is_refused_before_the_body_is_read() {
        let date = sigv4::amz_date(SystemTime::now());
        let authz = sign_as("AKIDACME", "s3cret", &date, b"", &[("x-amz-content-sha256", sigv4::UNSIGNED_PAYLOAD)]);
        let mut headers = signed_headers(&date, &authz);
        headers.push(("x-amz-content-sha256", sigv4::UNSIGNED_PAYLOAD));
        let err = keys().precheck(&signed(headers, b"")).err().expect("refused");
        assert_eq!(err.kind(), "InvalidSignatureException");
        assert!(err.to_string().contains("UNSIGNED-PAYLOAD"), "{err}");
    }

    #[test]
    fn the_headers_are_checked_without_the_body_and_the_signature_with_it() {
        let date = sigv4::amz_date(SystemTime::now());
        let authz = sign(&date, b"{\"real\":1}");
        let headers = signed_headers(&date, &authz);
        // Known key, date in its window: the body may be read...
        let pending = keys().precheck(&signed(headers.clone(), b"")).expect("headers pass");
        // ...and the signature then decides.
        assert_eq!(pending.finish(&signed(headers.clone(), b"{\"real\":1}")).unwrap().name, "acme");
        let pending = keys().precheck(&signed(headers.clone(), b"")).expect("headers pass");
        assert_eq!(
            pending.finish(&signed(headers, b"{\"forged\":1}")).unwrap_err().kind(),
            "InvalidSignatureException"
        );
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
        assert_eq!(tampered.kind(), "InvalidSignatureException");
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
            // 400 for a signature that is incomplete (IncompleteSignatureException), 403 otherwise.
            assert!(matches!(err.status(), StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST), "{headers:?}");
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
