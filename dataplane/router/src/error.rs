//! The router's one error type and how each API dialect renders it.
//!
//! Bedrock clients read the status code, the `x-amzn-ErrorType` header and `{"message"}`; OpenAI
//! clients read `{"error": {"message", "type", "code"}}`. Every variant has a stable kind string —
//! the Bedrock shape name — which is also the metric label.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The event-stream output unions of bedrock-runtime, whose exception members differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamUnion {
    /// ConverseStream's `ConverseStreamOutput`.
    ConverseStreamOutput,
    /// InvokeModelWithResponseStream's `ResponseStream`.
    ResponseStream,
}

impl StreamUnion {
    /// The exception members botocore's service model gives the union.
    pub fn exception_members(self) -> &'static [&'static str] {
        const CONVERSE: &[&str] = &[
            "internalServerException",
            "modelStreamErrorException",
            "validationException",
            "throttlingException",
            "serviceUnavailableException",
        ];
        const RESPONSE: &[&str] = &[
            "internalServerException",
            "modelStreamErrorException",
            "validationException",
            "throttlingException",
            "modelTimeoutException",
            "serviceUnavailableException",
        ];
        match self {
            StreamUnion::ConverseStreamOutput => CONVERSE,
            StreamUnion::ResponseStream => RESPONSE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    NotFound(String),
    /// The resource exists already, or is not in a state that allows the request (400, as the
    /// bedrock control plane models ConflictException).
    #[error("{0}")]
    Conflict(String),
    #[error("{message}")]
    ModelTimeout { message: String },
    #[error("{message}")]
    Throttling { message: String, retry_after: Duration },
    #[error("{0}")]
    ModelNotReady(String),
    #[error("{message}")]
    ModelError { message: String, original_status: u16 },
    #[error("{0}")]
    Internal(String),
    #[error("{message}")]
    Unavailable { message: String, retry_after: Duration },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The request's headers are over the limit (431).
    #[error("{0}")]
    HeadersTooLarge(String),
    /// The client did not send its body within the read timeout (408).
    #[error("{0}")]
    BodyTimeout(String),
    /// Authentication failed, with the exception AWS answers for this failure:
    /// `MissingAuthenticationTokenException`, `UnrecognizedClientException`,
    /// `InvalidSignatureException`, `IncompleteSignatureException` or `AccessDeniedException`.
    #[error("{message}")]
    Unauthenticated { code: &'static str, status: StatusCode, message: String },
}

impl ApiError {
    pub fn validation(message: impl Into<String>) -> Self {
        ApiError::Validation(message.into())
    }

    /// The Bedrock error shape name: `x-amzn-ErrorType`, and the metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Validation(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::HeadersTooLarge(_)
            | ApiError::BodyTimeout(_) => "ValidationException",
            ApiError::AccessDenied(_) => "AccessDeniedException",
            ApiError::Unauthenticated { code, .. } => code,
            ApiError::NotFound(_) => "ResourceNotFoundException",
            ApiError::Conflict(_) => "ConflictException",
            ApiError::ModelTimeout { .. } => "ModelTimeoutException",
            ApiError::Throttling { .. } => "ThrottlingException",
            ApiError::ModelNotReady(_) => "ModelNotReadyException",
            ApiError::ModelError { .. } => "ModelErrorException",
            ApiError::Internal(_) => "InternalServerException",
            ApiError::Unavailable { .. } => "ServiceUnavailableException",
        }
    }

    /// The status code bedrock-runtime models for this exception.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::AccessDenied(_) => StatusCode::FORBIDDEN,
            ApiError::Unauthenticated { status, .. } => *status,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::BAD_REQUEST,
            ApiError::ModelTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Throttling { .. } | ApiError::ModelNotReady(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ModelError { .. } => StatusCode::FAILED_DEPENDENCY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Throttling { retry_after, .. } | ApiError::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The exception frame for an error that happens mid-stream: a member (lowerCamel) that the
    /// stream's output union models, and its payload. botocore looks `:exception-type` up in the
    /// union; a name the union lacks reaches the caller as an error with no code and no message.
    pub fn stream_exception(&self, union: StreamUnion) -> (&'static str, serde_json::Value) {
        let member = match self {
            ApiError::Validation(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::HeadersTooLarge(_)
            | ApiError::BodyTimeout(_) => "validationException",
            ApiError::Throttling { .. } | ApiError::ModelNotReady(_) => "throttlingException",
            ApiError::Unavailable { .. } => "serviceUnavailableException",
            ApiError::ModelTimeout { .. } if union == StreamUnion::ResponseStream => "modelTimeoutException",
            // ConverseStreamOutput has no timeout member: the model's stream failed with a 408.
            ApiError::ModelTimeout { message } => {
                let body = serde_json::json!({
                    "message": message, "originalStatusCode": 408, "originalMessage": message,
                });
                return ("modelStreamErrorException", body);
            }
            ApiError::ModelError { .. } => "modelStreamErrorException",
            ApiError::AccessDenied(_)
            | ApiError::Unauthenticated { .. }
            | ApiError::NotFound(_)
            | ApiError::Conflict(_)
            | ApiError::Internal(_) => "internalServerException",
        };
        (member, self.bedrock_body())
    }

    /// The JSON body of the Bedrock error (and of an event-stream exception frame).
    pub fn bedrock_body(&self) -> serde_json::Value {
        match self {
            ApiError::ModelError { message, original_status } => {
                serde_json::json!({ "message": message, "originalStatusCode": original_status, "originalMessage": message })
            }
            other => serde_json::json!({ "message": other.to_string() }),
        }
    }

    /// Renders the error as Bedrock does.
    pub fn into_bedrock(self) -> Response {
        let mut response = (self.status(), axum::Json(self.bedrock_body())).into_response();
        let headers = response.headers_mut();
        headers.insert("x-amzn-ErrorType", HeaderValue::from_static(self.kind()));
        self.add_retry_headers(headers);
        response
    }

    /// Renders the error as the OpenAI API does.
    pub fn into_openai(self) -> Response {
        let (kind, code) = match &self {
            ApiError::Validation(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::HeadersTooLarge(_)
            | ApiError::BodyTimeout(_) => ("invalid_request_error", serde_json::Value::Null),
            ApiError::AccessDenied(_) => ("permission_denied", "permission_denied".into()),
            ApiError::Unauthenticated { .. } => ("authentication_error", "invalid_api_key".into()),
            ApiError::NotFound(_) => ("invalid_request_error", "model_not_found".into()),
            ApiError::Throttling { .. } | ApiError::ModelNotReady(_) => {
                ("rate_limit_exceeded", "rate_limit_exceeded".into())
            }
            ApiError::ModelTimeout { .. } => ("timeout", "timeout".into()),
            _ => ("server_error", serde_json::Value::Null),
        };
        let body = serde_json::json!({
            "error": { "message": self.to_string(), "type": kind, "param": null, "code": code }
        });
        let status = match self.status() {
            // OpenAI answers an unknown key with 401 (a known key without permission stays 403).
            StatusCode::FORBIDDEN if matches!(self, ApiError::Unauthenticated { .. }) => StatusCode::UNAUTHORIZED,
            other => other,
        };
        let mut response = (status, axum::Json(body)).into_response();
        self.add_retry_headers(response.headers_mut());
        response
    }

    fn add_retry_headers(&self, headers: &mut axum::http::HeaderMap) {
        if let Some(after) = self.retry_after() {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_bedrock()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Why the router could not start, or could not take a new platform: what it was given (keys,
/// runners, manifests, certificates, addresses) is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("loading the keys file: {0}")]
    Keys(#[from] crate::tenants::KeysError),
    #[error("reading {path}: {message}")]
    RunnersFile { path: String, message: String },
    #[error("runner address {address:?}: {source}")]
    RunnerAddress { address: String, source: tonic::transport::Error },
    #[error(transparent)]
    Manifests(#[from] mantle_crds::ManifestError),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("loading the TLS certificate: {0}")]
    Tls(#[from] crate::listener::ListenerError),
    #[error("binding {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
}

/// The error for a runner that went away (its process died, its connection broke) or stopped
/// answering: retryable, and free of transport internals.
pub fn runner_lost() -> ApiError {
    ApiError::Unavailable {
        message: "The model runner serving this request became unavailable. Retry the request.".into(),
        retry_after: Duration::from_secs(1),
    }
}

/// Maps a runner's gRPC status to the error a client sees. A status the runner did not send
/// itself — one made from a transport failure, which carries its source — means the runner is
/// gone.
pub fn from_status(status: &tonic::Status) -> ApiError {
    use tonic::Code;
    if std::error::Error::source(status).is_some() {
        tracing::warn!(code = ?status.code(), error = %status, "lost the runner");
        return runner_lost();
    }
    let message = status.message().to_string();
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => ApiError::Validation(message),
        Code::DeadlineExceeded => ApiError::ModelTimeout { message },
        Code::ResourceExhausted => ApiError::Throttling { message, retry_after: Duration::from_secs(1) },
        Code::Unavailable => ApiError::Unavailable { message, retry_after: Duration::from_secs(1) },
        Code::FailedPrecondition => ApiError::ModelNotReady(message),
        Code::Cancelled => ApiError::ModelError { message, original_status: 499 },
        _ => ApiError::ModelError { message, original_status: 500 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bedrock_errors_carry_the_shape_name_and_status() {
        let r = ApiError::NotFound("no model x".into()).into_bedrock();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()["x-amzn-ErrorType"], "ResourceNotFoundException");
        let r = ApiError::Throttling { message: "slow down".into(), retry_after: Duration::from_millis(1500) }
            .into_bedrock();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn grpc_statuses_map_to_bedrock_exceptions() {
        assert_eq!(from_status(&tonic::Status::invalid_argument("x")).kind(), "ValidationException");
        assert_eq!(from_status(&tonic::Status::deadline_exceeded("x")).kind(), "ModelTimeoutException");
        assert_eq!(from_status(&tonic::Status::unavailable("x")).kind(), "ServiceUnavailableException");
        assert_eq!(from_status(&tonic::Status::internal("x")).kind(), "ModelErrorException");
    }

    #[test]
    fn a_transport_failure_is_a_retryable_unavailable_without_internals() {
        let broken = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "h2 protocol error: connection reset by peer",
        )));
        let error = from_status(&broken);
        assert_eq!(error.kind(), "ServiceUnavailableException");
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!error.to_string().contains("h2"), "{error}");
    }

    fn every_error() -> Vec<ApiError> {
        let after = Duration::from_secs(1);
        vec![
            ApiError::Validation("v".into()),
            ApiError::AccessDenied("a".into()),
            ApiError::NotFound("n".into()),
            ApiError::ModelTimeout { message: "t".into() },
            ApiError::Throttling { message: "s".into(), retry_after: after },
            ApiError::ModelNotReady("r".into()),
            ApiError::ModelError { message: "e".into(), original_status: 500 },
            ApiError::Internal("i".into()),
            ApiError::Unavailable { message: "u".into(), retry_after: after },
            ApiError::PayloadTooLarge("p".into()),
            ApiError::UnsupportedMediaType("m".into()),
        ]
    }

    #[test]
    fn mid_stream_errors_use_members_of_the_streams_own_union() {
        for union in [StreamUnion::ConverseStreamOutput, StreamUnion::ResponseStream] {
            for error in every_error() {
                let (member, body) = error.stream_exception(union);
                assert!(union.exception_members().contains(&member), "{union:?} has no {member} (for {error:?})");
                assert_eq!(body["message"], error.to_string());
                if member == "modelStreamErrorException" {
                    assert!(body["originalStatusCode"].is_u64() && body["originalMessage"].is_string(), "{body}");
                }
            }
        }
        let timeout = ApiError::ModelTimeout { message: "too slow".into() };
        assert_eq!(timeout.stream_exception(StreamUnion::ResponseStream).0, "modelTimeoutException");
        let (member, body) = timeout.stream_exception(StreamUnion::ConverseStreamOutput);
        assert_eq!((member, &body["originalStatusCode"]), ("modelStreamErrorException", &serde_json::json!(408)));
    }
}
