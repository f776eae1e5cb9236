//! The HTTP client for one upstream: one connection pool (HTTP/1.1 keep-alive, HTTP/2 where TLS
//! negotiates it) shared by every request, bounded reads, and the one place upstream failures
//! become gRPC statuses.

use std::time::Duration;

use serde_json::Value;
use tonic::Status;

use super::openai::error_message;

/// The most an upstream's JSON answer (or error body) may hold; a stream is bounded per event by
/// the SSE decoder instead.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// Why a call to the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream {url} did not answer: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("the upstream {url} did not answer within {}ms", timeout.as_millis())]
    Timeout { url: String, timeout: Duration },
    #[error("the upstream answered {url} with HTTP {status}: {message}")]
    Status { url: String, status: u16, message: String },
    #[error("the upstream's answer to {url} is malformed: {reason}")]
    Malformed { url: String, reason: String },
}

impl UpstreamError {
    /// The gRPC status the router acts on: the client's fault is INVALID_ARGUMENT with the
    /// upstream's own words; an overloaded upstream RESOURCE_EXHAUSTED; one that is down or
    /// failing UNAVAILABLE, so the router tries another replica or refuses cleanly.
    pub fn status(&self) -> Status {
        match self {
            UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. } | UpstreamError::Malformed { .. } => {
                Status::unavailable(self.to_string())
            }
            UpstreamError::Status { status, message, .. } => match status {
                // The platform's misconfiguration, not the caller's: another replica may have it right.
                401 | 403 => Status::unavailable(format!(
                    "the upstream refused the runner's credentials (HTTP {status}): {message}"
                )),
                429 => Status::resource_exhausted(format!("the upstream is at capacity: {message}")),
                400..=499 => Status::invalid_argument(message.clone()),
                _ => Status::unavailable(self.to_string()),
            },
        }
    }

    /// The upstream has no such endpoint.
    pub fn is_not_found(&self) -> bool {
        matches!(self, UpstreamError::Status { status: 404 | 405 | 501, .. })
    }
}

/// One upstream server.
#[derive(Clone)]
pub struct Upstream {
    base: String,
    client: reqwest::Client,
    /// Without idle connections: the second try of a request whose pooled connection died.
    fresh: reqwest::Client,
    api_key: Option<String>,
}

impl Upstream {
    /// A client for the server at `base` (`http://host:port`, with or without a trailing `/v1`
    /// left off), sending `api_key` as a bearer token when given.
    pub fn new(base: &str, api_key: Option<String>) -> Result<Self, reqwest::Error> {
        let base = base.trim_end_matches('/').trim_end_matches("/v1").to_string();
        let builder = || reqwest::Client::builder().tcp_nodelay(true).connect_timeout(Duration::from_secs(2));
        let client = builder()
            // Below the servers' own keep-alive (uvicorn's and llama.cpp's 5 s), so that an idle
            // connection is not picked as the server times it out.
            .pool_idle_timeout(Duration::from_secs(4))
            .pool_max_idle_per_host(256)
            .build()?;
        let fresh = builder().pool_max_idle_per_host(0).build()?;
        Ok(Self { base, client, fresh, api_key })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.request_on(&self.client, method, path)
    }

    fn request_on(&self, client: &reqwest::Client, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = client.request(method, self.url(path));
        match &self.api_key {
            Some(key) => r.bearer_auth(key),
            None => r,
        }
    }

    fn post_on(&self, client: &reqwest::Client, path: &str, body: &str) -> reqwest::RequestBuilder {
        self.request_on(client, reqwest::Method::POST, path)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
    }

    /// A request and its second try on a new connection.
    fn post(&self, path: &str, body: &Value) -> (reqwest::RequestBuilder, reqwest::RequestBuilder) {
        let body = body.to_string();
        (self.post_on(&self.client, path, &body), self.post_on(&self.fresh, path, &body))
    }

    fn get(&self, path: &str) -> (reqwest::RequestBuilder, reqwest::RequestBuilder) {
        (self.request(reqwest::Method::GET, path), self.request_on(&self.fresh, reqwest::Method::GET, path))
    }

    /// Sends `request`; a non-2xx answer becomes [`UpstreamError::Status`] with the upstream's
    /// message. `timeout` bounds the wait for the answer's head.
    async fn send(
        &self,
        path: &str,
        (request, retry): (reqwest::RequestBuilder, reqwest::RequestBuilder),
        timeout: Duration,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = self.url(path);
        let deadline = tokio::time::Instant::now() + timeout;
        let response = match tokio::time::timeout_at(deadline, request.send()).await {
            Err(_) => return Err(UpstreamError::Timeout { url, timeout }),
            // A kept-alive connection the server closed as the request went out (llama.cpp's
            // server closes one after each streamed answer, though it says keep-alive): the server
            // never saw the request, so it is sent once more, on a new connection.
            Ok(Err(source)) if source.is_request() && !source.is_connect() && !source.is_timeout() => {
                tracing::debug!(error = %source, "the upstream closed a pooled connection; sending again");
                match tokio::time::timeout_at(deadline, retry.send()).await {
                    Err(_) => return Err(UpstreamError::Timeout { url, timeout }),
                    Ok(Err(source)) => return Err(UpstreamError::Unreachable { url, source }),
                    Ok(Ok(r)) => r,
                }
            }
            Ok(Err(source)) => return Err(UpstreamError::Unreachable { url, source }),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = read_body(response, 64 << 10).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| error_message(&v))
            .unwrap_or_else(|| text.trim().chars().take(500).collect());
        let message = if message.is_empty() { status.to_string() } else { message };
        Err(UpstreamError::Status { url, status: status.as_u16(), message })
    }

    /// POSTs `body` and returns the answer to stream from.
    pub async fn post_stream(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send(path, self.post(path, body), timeout).await
    }

    /// POSTs `body` and reads the JSON answer.
    pub async fn post_json(&self, path: &str, body: &Value, timeout: Duration) -> Result<Value, UpstreamError> {
        let response = self.send(path, self.post(path, body), timeout).await?;
        self.json(path, response, timeout).await
    }

    /// GETs `path` and reads the JSON answer.
    pub async fn get_json(&self, path: &str, timeout: Duration) -> Result<Value, UpstreamError> {
        let response = self.send(path, self.get(path), timeout).await?;
        self.json(path, response, timeout).await
    }

    /// GETs `path` and reads the answer as text.
    pub async fn get_text(&self, path: &str, timeout: Duration) -> Result<String, UpstreamError> {
        let response = self.send(path, self.get(path), timeout).await?;
        let body = self.body(path, response, timeout).await?;
        String::from_utf8(body)
            .map_err(|_| UpstreamError::Malformed { url: self.url(path), reason: "not UTF-8".into() })
    }

    async fn body(&self, path: &str, response: reqwest::Response, timeout: Duration) -> Result<Vec<u8>, UpstreamError> {
        let url = self.url(path);
        match tokio::time::timeout(timeout, read_body(response, MAX_BODY_BYTES)).await {
            Err(_) => Err(UpstreamError::Timeout { url, timeout }),
            Ok(Err(BodyError::TooLarge)) => {
                Err(UpstreamError::Malformed { url, reason: format!("more than {MAX_BODY_BYTES} bytes") })
            }
            Ok(Err(BodyError::Read(source))) => Err(UpstreamError::Unreachable { url, source }),
            Ok(Ok(body)) => Ok(body),
        }
    }

    async fn json(&self, path: &str, response: reqwest::Response, timeout: Duration) -> Result<Value, UpstreamError> {
        let body = self.body(path, response, timeout).await?;
        serde_json::from_slice(&body)
            .map_err(|e| UpstreamError::Malformed { url: self.url(path), reason: format!("not JSON: {e}") })
    }
}

enum BodyError {
    TooLarge,
    Read(reqwest::Error),
}

/// Reads a whole body of at most `limit` bytes.
async fn read_body(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Read)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, message: &str) -> Status {
        UpstreamError::Status { url: "http://u/v1/x".into(), status: code, message: message.into() }.status()
    }

    #[test]
    fn upstream_failures_map_to_the_statuses_the_router_acts_on() {
        let s = status(400, "max_tokens must be at least 1, got 0.");
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "max_tokens must be at least 1, got 0.", "the upstream's own words");
        assert_eq!(status(404, "model not found").code(), tonic::Code::InvalidArgument);
        assert_eq!(status(429, "busy").code(), tonic::Code::ResourceExhausted);
        assert_eq!(status(503, "loading").code(), tonic::Code::Unavailable);
        assert_eq!(status(500, "boom").code(), tonic::Code::Unavailable);
        assert_eq!(status(401, "bad key").code(), tonic::Code::Unavailable);
        let timeout = UpstreamError::Timeout { url: "u".into(), timeout: Duration::from_millis(5) };
        assert_eq!(timeout.status().code(), tonic::Code::Unavailable);
    }

    #[test]
    fn the_base_url_takes_a_trailing_slash_or_v1() {
        for base in
            ["http://127.0.0.1:8080", "http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1/"]
        {
            assert_eq!(Upstream::new(base, None).unwrap().base(), "http://127.0.0.1:8080", "{base}");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let upstream = Upstream::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let err = upstream.get_json("/v1/models", Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err:?}");
        assert_eq!(err.status().code(), tonic::Code::Unavailable);
    }
}
