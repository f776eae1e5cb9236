//! The HTTP API: routes, and one middleware that every request passes — request id, body limit,
//! authentication, the `x-amzn-RequestId` header and the error dialect (Bedrock or OpenAI).

mod bedrock;
mod control;
mod openai;
mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use mantle_admission::Priority;

use crate::auth::{Auth, Signed};
use crate::error::ApiError;
use crate::inference::{Ctx, Inference};
use crate::tenants::Tenant;

/// Everything a handler needs.
pub struct AppState {
    pub inference: Arc<Inference>,
    pub auth: Auth,
    pub max_request_bytes: usize,
}

pub type Shared = Arc<AppState>;

/// What the middleware learned about a request, for the handlers.
#[derive(Clone)]
pub struct Caller {
    pub request_id: String,
    pub tenant: Tenant,
    pub received: Instant,
}

impl Caller {
    /// The request context: priority (the tenant's, lowered by `x-mantle-priority`) and deadline
    /// (`x-amz-bedrock-deadline-ms`, milliseconds from now).
    pub fn ctx(&self, api: &'static str, headers: &HeaderMap) -> Result<Ctx, ApiError> {
        let mut priority = self.tenant.priority;
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
                let ms: u64 = v.to_str().ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| {
                    ApiError::validation("x-amz-bedrock-deadline-ms must be a whole number of milliseconds")
                })?;
                Some(self.received + Duration::from_millis(ms))
            }
        };
        Ok(Ctx {
            request_id: self.request_id.clone(),
            tenant: self.tenant.clone(),
            api,
            priority,
            deadline,
            received: self.received,
        })
    }
}

/// The whole HTTP surface.
pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/model/{model_id}/converse", post(bedrock::converse))
        .route("/model/{model_id}/converse-stream", post(bedrock::converse_stream))
        .route("/model/{model_id}/invoke", post(bedrock::invoke))
        .route("/model/{model_id}/invoke-with-response-stream", post(bedrock::invoke_stream))
        .route("/model/{model_id}/count-tokens", post(bedrock::count_tokens))
        .route("/foundation-models", get(control::list_foundation_models))
        .route("/foundation-models/{model_id}", get(control::get_foundation_model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{model_id}", get(openai::get_model))
        .fallback(unknown_operation)
        .layer(middleware::from_fn_with_state(state.clone(), front_door));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(state)
}

fn is_openai(path: &str) -> bool {
    path.starts_with("/v1/")
}

/// Renders an error in the dialect of the path it answers.
pub fn error_response(path: &str, error: ApiError) -> Response {
    if is_openai(path) { error.into_openai() } else { error.into_bedrock() }
}

/// Request id, body limit, authentication, `x-amzn-RequestId`.
async fn front_door(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let received = Instant::now();
    let path = request.uri().path().to_string();
    let mut response = match admit(&state, request, &request_id, received).await {
        Ok(request) => next.run(request).await,
        Err(error) => {
            tracing::debug!(%request_id, %path, error = %error, "request refused at the door");
            error_response(&path, error)
        }
    };
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        // The same id under the name OpenAI's clients read (`_request_id`).
        response.headers_mut().insert("x-request-id", id.clone());
        response.headers_mut().insert("x-amzn-RequestId", id);
    }
    response
}

async fn admit(state: &AppState, request: Request, request_id: &str, received: Instant) -> Result<Request, ApiError> {
    let (mut parts, body) = request.into_parts();
    let limit = state.max_request_bytes;
    let too_large = |n: Option<usize>| {
        ApiError::PayloadTooLarge(match n {
            Some(n) => format!("The request body is {n} bytes; the limit is {limit} bytes."),
            None => format!("The request body is over the limit of {limit} bytes."),
        })
    };
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|&n| n > limit) {
        return Err(too_large(Some(n)));
    }
    let body: Bytes = axum::body::to_bytes(body, limit).await.map_err(|_| too_large(None))?;
    let headers: Vec<(&str, &str)> =
        parts.headers.iter().filter_map(|(name, value)| value.to_str().ok().map(|v| (name.as_str(), v))).collect();
    let mut headers = headers;
    // HTTP/1.1 carries the host as a header; SigV4 signs it.
    let authority = parts.uri.authority().map(|a| a.as_str().to_string());
    if let Some(authority) = authority.as_deref()
        && !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host"))
    {
        headers.push(("host", authority));
    }
    let signed = Signed {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers,
        body: &body,
    };
    let tenant = state.auth.authenticate(&signed)?;
    parts.extensions.insert(Caller { request_id: request_id.to_string(), tenant, received });
    Ok(Request::from_parts(parts, Body::from(body)))
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

/// 200 only when every model has a ready runner.
async fn readyz(State(state): State<Shared>) -> Response {
    let live = state.inference.live();
    let missing: Vec<&str> =
        live.catalog.iter().filter(|m| !live.runners.ready(&m.model_id)).map(|m| m.model_id.as_str()).collect();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("waiting for runners of: {}\n", missing.join(", "))).into_response()
    }
}

async fn metrics(State(state): State<Shared>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.inference.metrics.render()).into_response()
}

/// Answers an error in a dialect, counted under the model the client asked for; refusals under
/// load carry `x-mantle-capacity`.
fn fail(state: &AppState, api: &str, model: &str, error: ApiError, render: fn(ApiError) -> Response) -> Response {
    state.inference.metrics.requests.with_label_values(&[api, model, error.kind()]).inc();
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
