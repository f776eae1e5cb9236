//! The router as batch workers see it: InvokeModel, Converse and CountTokens over HTTP, with the
//! batch credential (`x-mantle-batch-token`), so requests are admitted at batch priority and never
//! against a tenant's real-time token buckets.

use std::time::Duration;

use bytes::Bytes;
use mantle_crds::{BatchTier, InvocationType};
use serde_json::Value;

/// The header that marks a request as batch work.
pub const BATCH_TOKEN_HEADER: &str = "x-mantle-batch-token";
/// The header with the job's tier, which decides how much of the model's capacity it may take.
pub const BATCH_TIER_HEADER: &str = "x-mantle-batch-tier";

#[derive(Clone)]
pub struct RouterClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// A model's answer to one record.
#[derive(Debug)]
pub struct Answer {
    pub body: Bytes,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The router refused the record itself (a 4xx other than throttling): it becomes an error
    /// record.
    #[error("{status} {kind}: {message}")]
    Refused { status: u16, kind: String, message: String },
    /// Capacity or availability (429, 503, a model not ready, a lost connection): try again later.
    #[error("{0}")]
    Retry(String),
    /// A server fault (other 5xx): retried a few times, then an error record.
    #[error("{status} {kind}: {message}")]
    Fault { status: u16, kind: String, message: String },
}

impl RouterClient {
    pub fn new(base: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("the HTTP client builds");
        RouterClient { http, base: base.trim_end_matches('/').to_string(), token: token.to_string() }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn encode(model: &str) -> String {
        url::form_urlencoded::byte_serialize(model.as_bytes()).collect()
    }

    async fn post(&self, path: &str, body: Vec<u8>, tier: BatchTier) -> Result<reqwest::Response, CallError> {
        let tier = match tier {
            BatchTier::Standard => "STANDARD",
            BatchTier::Economy => "ECONOMY",
            BatchTier::Spot => "SPOT",
        };
        let response = self
            .http
            .post(self.url(path))
            .header(BATCH_TOKEN_HEADER, &self.token)
            .header(BATCH_TIER_HEADER, tier)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| CallError::Retry(format!("the router did not answer: {e}")))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(error_of(response).await)
    }

    /// Whether the router serves the model (GetFoundationModel).
    pub async fn model_exists(&self, model: &str) -> Result<bool, CallError> {
        let response = self
            .http
            .get(self.url(&format!("/foundation-models/{}", Self::encode(model))))
            .header(BATCH_TOKEN_HEADER, &self.token)
            .send()
            .await
            .map_err(|e| CallError::Retry(format!("the router did not answer: {e}")))?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(error_of(response).await),
        }
    }

    /// A record's prompt tokens, by the model's own tokenizer.
    pub async fn count_tokens(&self, model: &str, kind: InvocationType, input: &str) -> Result<u64, CallError> {
        use base64::Engine;
        let encode = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let body = match kind {
            InvocationType::InvokeModel => {
                serde_json::json!({"input": {"invokeModel": {"body": encode(input.as_bytes())}}})
            }
            InvocationType::Converse => {
                let value: Value = serde_json::from_str(input).map_err(|e| CallError::Refused {
                    status: 400,
                    kind: "ValidationException".into(),
                    message: e.to_string(),
                })?;
                // CountTokens takes the conversation only.
                let mut converse = serde_json::Map::new();
                for key in ["messages", "system", "toolConfig"] {
                    if let Some(v) = value.get(key) {
                        converse.insert(key.to_string(), v.clone());
                    }
                }
                serde_json::json!({"input": {"converse": converse}})
            }
        };
        let response = self
            .post(&format!("/model/{}/count-tokens", Self::encode(model)), body.to_string().into(), BatchTier::Standard)
            .await?;
        let bytes = response.bytes().await.map_err(|e| CallError::Retry(format!("CountTokens answer: {e}")))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        value["inputTokens"].as_u64().ok_or_else(|| CallError::Retry("CountTokens answered without inputTokens".into()))
    }

    /// Runs one record, for a job of `tier` (the router admits it as that tier allows, and says
    /// "try later" otherwise).
    pub async fn run(
        &self,
        model: &str,
        kind: InvocationType,
        tier: BatchTier,
        body: Vec<u8>,
    ) -> Result<Answer, CallError> {
        let op = match kind {
            InvocationType::InvokeModel => "invoke",
            InvocationType::Converse => "converse",
        };
        let response = self.post(&format!("/model/{}/{op}", Self::encode(model)), body, tier).await?;
        let header =
            |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let (mut input_tokens, mut output_tokens) =
            (header("x-amzn-bedrock-input-token-count"), header("x-amzn-bedrock-output-token-count"));
        let body = response.bytes().await.map_err(|e| CallError::Retry(format!("the answer broke off: {e}")))?;
        if input_tokens.is_none() || output_tokens.is_none() {
            // Converse reports usage in its body.
            let value: Value = serde_json::from_slice(&body).unwrap_or_default();
            input_tokens = input_tokens.or(value["usage"]["inputTokens"].as_u64());
            output_tokens = output_tokens.or(value["usage"]["outputTokens"].as_u64());
        }
        Ok(Answer { body, input_tokens: input_tokens.unwrap_or(0), output_tokens: output_tokens.unwrap_or(0) })
    }
}

async fn error_of(response: reqwest::Response) -> CallError {
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(':').next().unwrap_or(v).to_string())
        .unwrap_or_default();
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["message"].as_str().or(v["Message"].as_str()).map(str::to_string))
        .unwrap_or(text);
    match status {
        // 408: the request waited past the router's timeout (real-time traffic kept the model).
        408 | 429 | 502 | 503 | 504 => CallError::Retry(format!("{status} {kind}: {message}")),
        // A model that is loading or scaling from zero.
        _ if kind == "ModelNotReadyException" => CallError::Retry(format!("{status} {kind}: {message}")),
        400..=499 => CallError::Refused { status, kind, message },
        _ => CallError::Fault { status, kind, message },
    }
}
