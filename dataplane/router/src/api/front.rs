//! What every request passes before a handler, composed in one place ([`layer`]) from
//! tower-http's layers and two of our own:
//!
//! ```text
//! request id (x-amzn-RequestId, server-made) ─► error shape ─► request timeout ─► body limit
//!   ─► authenticate (headers first, then the body under a read timeout) ─► handler
//! ```
//!
//! Authentication decides everything the headers allow before a body byte is read, so an
//! anonymous client cannot make the router buffer bodies. Every refusal on the way — the
//! layers' plain-text 408/413, axum's rejections (a path that is not UTF-8, say), unknown routes —
//! leaves in the API's own error shape: Bedrock's JSON with `x-amzn-ErrorType`, or OpenAI's error
//! object under `/v1/`.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;

use super::{Caller, Shared, error_response};
use crate::auth::Signed;
use crate::batch::{BATCH_TENANT_HEADER, BATCH_TIER_HEADER, BATCH_TOKEN_HEADER};
use crate::error::ApiError;
use crate::tenants::Tenant;

/// What a client may send, and how long it may take.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The most bytes a request body may have.
    pub max_request_bytes: usize,
    /// The most bytes a request's headers may have together (names and values).
    pub max_header_bytes: usize,
    /// The whole body must arrive within this once the headers are in.
    pub body_timeout: Duration,
    /// A response must start within this (a stream's events may then take longer; the runner
    /// streams are bounded by their own idle timeout).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 10 << 20,
            max_header_bytes: 64 << 10,
            body_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
        }
    }
}

/// The header carrying the request id, on the request (for handlers) and the response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-amzn-requestid");

/// Wraps `routes` in the front door. `authenticate` is false for the unauthenticated probes.
pub fn layer(routes: Router<Shared>, state: &Shared, authenticate: bool) -> Router<Shared> {
    let limits = &state.limits;
    let routes = if authenticate { routes.layer(middleware::from_fn_with_state(state.clone(), admit)) } else { routes };
    routes
        // The front door has enforced the limit already; axum's extractors must not apply their
        // own 2 MiB default on top.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(limits.max_request_bytes))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.request_timeout))
        .layer(middleware::from_fn(shape_errors))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        // The id is the server's: one a client sends is dropped, not trusted.
        .layer(middleware::map_request(|mut request: Request| async move {
            request.headers_mut().remove(REQUEST_ID);
            request
        }))
}

/// The request id the front door gave this request.
pub fn request_id(request: &Request) -> String {
    request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Renders, in the API's own shape, any error answer that is not already in it (tower-http's
/// 408 and 413 carry no body; axum's rejections are plain text), and adds `x-request-id` (the
/// same id, for OpenAI clients) to every answer.
async fn shape_errors(request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let id = request.headers().get(REQUEST_ID).cloned();
    let response = next.run(request).await;
    let status = response.status();
    let shaped = response.headers().contains_key("x-amzn-ErrorType")
        || response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
    let mut response = if (status.is_client_error() || status.is_server_error()) && !shaped {
        let body = response.into_body();
        // These bodies are short texts; read at most a little of one.
        let text = axum::body::to_bytes(body, 1024).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text).trim().to_string();
        let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
        let error = match status {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(message),
            StatusCode::REQUEST_TIMEOUT => ApiError::ModelTimeout {
                message: "The request did not complete within the router's request timeout.".into(),
            },
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(message),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ApiError::HeadersTooLarge(message),
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => ApiError::NotFound(message),
            StatusCode::SERVICE_UNAVAILABLE => {
                ApiError::Unavailable { message, retry_after: std::time::Duration::from_secs(1) }
            }
            s if s.is_client_error() => ApiError::Validation(message),
            _ => ApiError::Internal(message),
        };
        tracing::debug!(%path, %status, error = %error, "refusal rendered in the API's shape");
        error_response(&path, error)
    } else {
        response
    };
    if let Some(id) = id {
        response.headers_mut().insert(HeaderName::from_static("x-request-id"), id);
    }
    response
}

/// Authentication around the body: the headers are checked (sizes, credentials) before a body
/// byte is read; the body is read under the size limit and a timeout; then the signature.
async fn admit(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let request_id = request_id(&request);
    match authenticate(&state, request, &request_id).await {
        Ok(request) => next.run(request).await,
        Err(error) => {
            tracing::debug!(%request_id, %path, error = %error, "request refused at the door");
            error_response(&path, error)
        }
    }
}

async fn authenticate(state: &Shared, request: Request, request_id: &str) -> Result<Request, ApiError> {
    let received = Instant::now();
    let limits = &state.limits;
    let (mut parts, body) = request.into_parts();
    let header_bytes: usize = parts.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if header_bytes > limits.max_header_bytes {
        return Err(ApiError::HeadersTooLarge(format!(
            "The request headers are {header_bytes} bytes; the limit is {} bytes.",
            limits.max_header_bytes
        )));
    }
    let mut headers: Vec<(&str, &str)> =
        parts.headers.iter().filter_map(|(name, value)| value.to_str().ok().map(|v| (name.as_str(), v))).collect();
    // HTTP/1.1 carries the host as a header; SigV4 signs it.
    let authority = parts.uri.authority().map(|a| a.as_str().to_string());
    if let Some(authority) = authority.as_deref()
        && !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host"))
    {
        headers.push(("host", authority));
    }
    let (method, path, query) = (parts.method.as_str(), parts.uri.path(), parts.uri.query().unwrap_or(""));
    // A batch worker is known by its token; anyone else signs or presents a key.
    let door = match batch_worker(state, &parts.headers)? {
        Some((tenant, tier)) => Door::Batch(tenant, tier),
        None => {
            Door::Signed(state.auth.precheck(&Signed { method, path, query, headers: headers.clone(), body: &[] })?)
        }
    };
    let limit = limits.max_request_bytes;
    let body: Bytes = match tokio::time::timeout(limits.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => {
            return Err(ApiError::BodyTimeout(format!(
                "The request body did not arrive within {}s.",
                limits.body_timeout.as_secs()
            )));
        }
        Ok(Err(e)) if is_length_limit(&e) => {
            return Err(ApiError::PayloadTooLarge(format!("The request body is over the limit of {limit} bytes.")));
        }
        Ok(Err(e)) => return Err(ApiError::validation(format!("The request body could not be read: {e}"))),
        Ok(Ok(body)) => body,
    };
    let (tenant, batch) = match door {
        Door::Batch(tenant, tier) => (tenant, Some(tier)),
        Door::Signed(pending) => (pending.finish(&Signed { method, path, query, headers, body: &body })?, None),
    };
    parts.extensions.insert(Caller { request_id: request_id.to_string(), tenant, received, batch });
    Ok(Request::from_parts(parts, Body::from(body)))
}

/// How a caller came in.
enum Door {
    /// With the batch token, working for this tenant, for a job of this tier.
    Batch(Tenant, mantle_crds::BatchTier),
    /// Through authentication, to be finished once the body is read.
    Signed(crate::auth::Pending),
}

/// A batch worker's tenant and job tier (`x-mantle-batch-tier`, `STANDARD` when absent), when the
/// request carries the batch token (`x-mantle-batch-token`); a token that does not match, or a
/// tier that is not one, is refused.
fn batch_worker(
    state: &Shared,
    headers: &axum::http::HeaderMap,
) -> Result<Option<(Tenant, mantle_crds::BatchTier)>, ApiError> {
    let Some(presented) = headers.get(BATCH_TOKEN_HEADER) else { return Ok(None) };
    let denied = || ApiError::Unauthenticated {
        code: "AccessDeniedException",
        status: axum::http::StatusCode::FORBIDDEN,
        message: "The batch token is not valid.".into(),
    };
    let expected = state.batch_token.as_deref().ok_or_else(denied)?;
    // Compared in constant time: the token is a secret.
    let presented = presented.as_bytes();
    let same = presented.len() == expected.len()
        && presented.iter().zip(expected.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if !same {
        return Err(denied());
    }
    let name = headers
        .get(BATCH_TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|n| !n.is_empty() && n.len() <= 128)
        .unwrap_or("batch");
    let tier = match headers.get(BATCH_TIER_HEADER).map(|v| v.to_str().unwrap_or("")) {
        None | Some("STANDARD") => mantle_crds::BatchTier::Standard,
        Some("ECONOMY") => mantle_crds::BatchTier::Economy,
        Some("SPOT") => mantle_crds::BatchTier::Spot,
        Some(other) => {
            return Err(ApiError::validation(format!(
                "{BATCH_TIER_HEADER} {other:?} must be STANDARD, ECONOMY or SPOT"
            )));
        }
    };
    Ok(Some((Tenant::unbounded(name), tier)))
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}
