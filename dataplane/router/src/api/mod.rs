//! The HTTP API: routes, behind the front door (`front`: request id, limits, timeouts,
//! authentication, the error dialect — Bedrock or OpenAI).

mod batch;
mod bedrock;
mod completions;
mod control;
mod front;
mod openai;
mod stream;

pub use front::Limits;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use mantle_admission::Priority;

use crate::auth::Auth;
use crate::batch::BatchJobs;
use crate::error::ApiError;
use crate::inference::{Ctx, Inference};
use crate::tenants::Tenant;

/// Everything a handler needs.
pub struct AppState {
    pub inference: Arc<Inference>,
    pub auth: Auth,
    pub limits: Limits,
    /// Where batch jobs live; `None` serves no batch API.
    pub batch_jobs: Option<Arc<dyn BatchJobs>>,
    /// The credential batch workers present; `None` admits no batch work.
    pub batch_token: Option<String>,
}

pub type Shared = Arc<AppState>;

/// The furthest `x-amz-bedrock-deadline-ms` that is a deadline (a year); beyond it, none.
const MAX_DEADLINE_MS: u64 = 365 * 24 * 3600 * 1000;

/// The longest caller cache salt accepted (`x-mantle-cache-salt`, OpenAI `cache_salt`).
pub const MAX_CACHE_SALT_BYTES: usize = 256;

/// Checks a caller's cache salt (`what` names where it came from).
pub fn check_cache_salt(salt: &str, what: &str) -> Result<(), ApiError> {
    if salt.len() > MAX_CACHE_SALT_BYTES {
        return Err(ApiError::validation(format!(
            "{what} is {} bytes; it must be at most {MAX_CACHE_SALT_BYTES}",
            salt.len()
        )));
    }
    Ok(())
}

/// What the front door learned about a request, for the handlers.
#[derive(Clone)]
pub struct Caller {
    pub request_id: String,
    pub tenant: Tenant,
    pub received: Instant,
    /// A batch worker (it presented the batch token): lowest priority, no token buckets.
    pub batch: Option<mantle_crds::BatchTier>,
}

impl Caller {
    /// The request context: priority (the tenant's, lowered by `x-mantle-priority`), deadline
    /// (`x-amz-bedrock-deadline-ms`, milliseconds from now) and cache salt
    /// (`x-mantle-cache-salt`).
    pub fn ctx(&self, api: &'static str, headers: &HeaderMap) -> Result<Ctx, ApiError> {
        let mut priority = if self.batch.is_some() { Priority::Low } else { self.tenant.priority };
        if let Some(value) = headers.get("x-mantle-priority") {
            let asked = match value.to_str().unwrap_or_default().to_ascii_uppercase().as_str() {
                "CRITICAL" => Priority::Critical,
                "HIGH" => Priority::High,
                "NORMAL" => Priority::Normal,
                "LOW" => Priority::Low,
                other => {
                    return Err(ApiError::validation(format!(
                        "x-mantle-priority {other:?} must be CRITICAL, HIGH, NORMAL or LOW"
                    )));
                }
            };
            // A request may lower its tenant's priority, never raise it.
            priority = priority.max(asked);
        }
        let deadline = match headers.get("x-amz-bedrock-deadline-ms") {
            None => None,
            Some(v) => {
                // Any run of digits is a number of milliseconds, however long.
                let digits =
                    v.to_str().ok().map(str::trim).filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
                let ms: u64 = digits.map(|s| s.parse().unwrap_or(u64::MAX)).ok_or_else(|| {
                    ApiError::validation("x-amz-bedrock-deadline-ms must be a whole number of milliseconds")
                })?;
                // A deadline further out than a year is none at all (saturating, never wrapping).
                (ms < MAX_DEADLINE_MS).then(|| self.received + Duration::from_millis(ms))
            }
        };
        let cache_salt = match headers.get("x-mantle-cache-salt") {
            None => String::new(),
            Some(v) => {
                let salt = v
                    .to_str()
                    .map_err(|_| ApiError::validation("x-mantle-cache-salt must be visible ASCII text"))?
                    .to_string();
                check_cache_salt(&salt, "x-mantle-cache-salt")?;
                salt
            }
        };
        Ok(Ctx {
            request_id: self.request_id.clone(),
            tenant: self.tenant.clone(),
            api,
            priority,
            deadline,
            received: self.received,
            cache_salt,
            batch: self.batch,
            settled: Default::default(),
        })
    }
}

/// The public HTTP surface. `/metrics` is not on it: the router serves it on its admin
/// listener ([`admin_router`]).
pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/model/{model_id}/converse", post(bedrock::converse))
        .route("/model/{model_id}/converse-stream", post(bedrock::converse_stream))
        .route("/model/{model_id}/invoke", post(bedrock::invoke))
        .route("/model/{model_id}/invoke-with-response-stream", post(bedrock::invoke_stream))
        .route("/model/{model_id}/count-tokens", post(bedrock::count_tokens))
        .route("/foundation-models", get(control::list_foundation_models))
        .route("/foundation-models/{model_id}", get(control::get_foundation_model))
        .route("/model-invocation-job", post(batch::create))
        .route("/model-invocation-job/{job}", get(batch::get))
        .route("/model-invocation-job/{job}/stop", post(batch::stop))
        .route("/model-invocation-jobs", get(batch::list))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{model_id}", get(openai::get_model))
        .fallback(unknown_operation);
    let probes = Router::new().route("/healthz", get(|| async { "ok" })).route("/readyz", get(readyz));
    front::layer(probes, &state, false).merge(front::layer(api, &state, true)).with_state(state)
}

/// The admin listener's surface: `/metrics`, and the probes.
pub fn admin_router(state: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

fn is_openai(path: &str) -> bool {
    path.starts_with("/v1/")
}

/// Renders an error in the dialect of the path it answers.
pub fn error_response(path: &str, error: ApiError) -> Response {
    if is_openai(path) { error.into_openai() } else { error.into_bedrock() }
}

async fn unknown_operation(request: Request) -> Response {
    let path = request.uri().path().to_string();
    if is_openai(&path) {
        // OpenAI's answer to a URL it does not serve.
        let message = format!(
            "Unknown request URL: {} {path}. Please check the URL for typos, or see the docs at \
             https://platform.openai.com/docs/api-reference/.",
            request.method()
        );
        let body = serde_json::json!({
            "error": { "message": message, "type": "invalid_request_error", "param": null, "code": "unknown_url" }
        });
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    }
    let error = ApiError::NotFound(format!("No operation matches {} {path}.", request.method()));
    let mut response = error.into_bedrock();
    response.headers_mut().insert("x-amzn-ErrorType", HeaderValue::from_static("UnknownOperationException"));
    response
}

/// 200 only when every model can admit requests.
async fn readyz(State(state): State<Shared>) -> Response {
    let live = state.inference.live();
    // Ready means able to admit: a runner is ready and admission has counted its slots.
    let missing: Vec<&str> = live
        .catalog
        .iter()
        .filter(|m| !live.runners.ready(&m.model_id) || !state.inference.admits(&m.model_id))
        .map(|m| m.model_id.as_str())
        .collect();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("waiting for runners of: {}\n", missing.join(", "))).into_response()
    }
}

async fn metrics(State(state): State<Shared>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.inference.metrics.render()).into_response()
}

/// The `model` label of requests for a model the catalog does not know.
pub const UNKNOWN_MODEL: &str = "unknown";

/// Answers an error in a dialect, counted under the model the client asked for; refusals under
/// load carry `x-mantle-capacity`.
fn fail(state: &AppState, api: &str, model: &str, error: ApiError, render: fn(ApiError) -> Response) -> Response {
    // Labelled by a model the catalog knows, never by the client's string: unknown ids would
    // each make a new series.
    let live = state.inference.live();
    let label = live.catalog.resolve(model).map_or(UNKNOWN_MODEL, |m| m.model_id.as_str());
    state.inference.ledger.refused(api, label, error.kind());
    let shed = matches!(error, ApiError::Throttling { .. } | ApiError::Unavailable { .. });
    let mut response = render(error);
    if shed
        && let Some(capacity) = state.inference.capacity_header(model)
        && let Ok(value) = HeaderValue::from_str(&capacity)
    {
        response.headers_mut().insert("x-mantle-capacity", value);
    }
    response
}

/// Refuses a `Content-Type` (or `Accept`) header that is present and not JSON.
pub fn require_json(headers: &HeaderMap, name: &str) -> Result<(), ApiError> {
    match headers.get(name).and_then(|v| v.to_str().ok()) {
        None => Ok(()),
        Some(v) if v.starts_with("application/json") || v.starts_with("*/*") || v.is_empty() => Ok(()),
        Some(other) => {
            Err(ApiError::UnsupportedMediaType(format!("{name} {other:?} is not supported; send application/json")))
        }
    }
}
