//! Guardrails on the request path: a request naming a guardrail the router does not have is
//! refused, never silently served unguarded; and an output guard's block is applied the same way
//! by every API — the reply stops at the block and says the guardrail intervened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use mantle_awswire::eventstream::Decoder;
use mantle_router::guard::{Guards, OutputGuard, OutputVerdict};
use mantle_router::inference::{Ctx, Inference};
use mantle_router::test_support::{RunningStandIn, StandInConfig, stand_in};
use mantle_router::{Platform, RouterConfig, RunnerSpec};
use serde_json::{Value, json};
use tower::ServiceExt;

mod support;

use support::send;

const TEXT: &str = "acme.text-v1:0";

/// Blocks the reply at the delta that contains a word.
struct BlockOn(&'static str);

impl OutputGuard for BlockOn {
    fn check(&self, _ctx: &Ctx, _so_far: &str, delta: &str) -> OutputVerdict {
        if delta.contains(self.0) { OutputVerdict::Block("[blocked]".into()) } else { OutputVerdict::Pass }
    }
}

async fn app() -> (axum::Router, Arc<Inference>, RunningStandIn) {
    let s = stand_in(StandInConfig::default()).await;
    let model = serde_norway::from_str(&format!(
        "apiVersion: mantle.dev/v1alpha1\nkind: FoundationModel\nmetadata: {{name: m}}\nspec:\n  modelId: {TEXT}\n  provider: Acme\n  modality: TEXT\n  source: {{uri: 's3://b/m.gguf', format: gguf}}\n  contextLength: 4096\n"
    ))
    .unwrap();
    let platform = Platform {
        models: vec![model],
        runners: vec![RunnerSpec { model: TEXT.into(), address: s.address(), pool: None, cell: None }],
        ..Platform::default()
    };
    let (app, inference) =
        mantle_router::build(&RouterConfig::local("127.0.0.1:0".parse().unwrap()), platform).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !inference.admits(TEXT) {
        assert!(Instant::now() < deadline, "the stand-in never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (app, inference, s)
}

fn post(path: &str) -> axum::http::request::Builder {
    Request::post(path).header("content-type", "application/json")
}

#[tokio::test]
async fn a_guardrail_the_router_does_not_have_is_refused() {
    let (app, ..) = app().await;
    let converse = json!({"messages": [{"role": "user", "content": [{"text": "hi"}]}],
        "guardrailConfig": {"guardrailIdentifier": "gr-pii", "guardrailVersion": "1"}});
    let request = post("/model/acme.text-v1%3A0/converse").body(Body::from(converse.to_string())).unwrap();
    let (status, headers, body) = send(&app, request).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-amzn-ErrorType"], "ResourceNotFoundException");
    assert!(String::from_utf8_lossy(&body).contains("gr-pii"));
    // streamProcessingMode is ConverseStream's alone: Converse refuses it as an unknown field.
    let mut streaming = converse.clone();
    streaming["guardrailConfig"]["streamProcessingMode"] = json!("async");
    let request = post("/model/acme.text-v1%3A0/converse").body(Body::from(streaming.to_string())).unwrap();
    let (status, headers, body) = send(&app, request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-amzn-ErrorType"], "ValidationException");
    assert!(String::from_utf8_lossy(&body).contains("streamProcessingMode"));
    let request = post("/model/acme.text-v1%3A0/converse-stream").body(Body::from(streaming.to_string())).unwrap();
    assert_eq!(send(&app, request).await.0, StatusCode::NOT_FOUND, "ConverseStream takes it");
    let invoke = json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let request = post("/model/acme.text-v1%3A0/invoke")
        .header("x-amzn-bedrock-guardrailidentifier", "gr-pii")
        .header("x-amzn-bedrock-guardrailversion", "2")
        .body(Body::from(invoke.to_string()))
        .unwrap();
    let (status, headers, _) = send(&app, request).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["x-amzn-ErrorType"], "ResourceNotFoundException");
}

#[tokio::test]
async fn every_api_stops_at_a_block_and_reports_the_intervention() {
    let (app, inference, _s) = app().await;
    inference.set_guards(Guards { input: vec![], output: vec![Arc::new(BlockOn("tok2"))] });

    // OpenAI, whole reply: the intervention is reported as content_filter.
    let chat = json!({"model": TEXT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8});
    let (status, _, body) = send(&app, post("/v1/chat/completions").body(Body::from(chat.to_string())).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let reply: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply["choices"][0]["finish_reason"], "content_filter", "{reply}");
    assert_eq!(reply["choices"][0]["message"]["content"], "[blocked]");

    // Converse, whole reply.
    let converse = json!({"messages": [{"role": "user", "content": [{"text": "hi"}]}]});
    let (_, _, body) =
        send(&app, post("/model/acme.text-v1%3A0/converse").body(Body::from(converse.to_string())).unwrap()).await;
    let reply: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply["stopReason"], "guardrail_intervened", "{reply}");

    // The native stream stops at the block instead of streaming on.
    let invoke = json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
    let request =
        post("/model/acme.text-v1%3A0/invoke-with-response-stream").body(Body::from(invoke.to_string())).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let mut decoder = Decoder::new();
    decoder.push(&bytes);
    let mut deltas = Vec::new();
    let mut types = Vec::new();
    while let Some(message) = decoder.next_message().unwrap() {
        let payload: Value = serde_json::from_slice(&message.payload).unwrap();
        let chunk = base64::engine::general_purpose::STANDARD.decode(payload["bytes"].as_str().unwrap()).unwrap();
        let chunk: Value = serde_json::from_slice(&chunk).unwrap();
        types.push(chunk["type"].as_str().unwrap_or_default().to_string());
        if chunk["type"] == "content_block_delta" {
            deltas.push(chunk["delta"]["text"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(deltas, [" tok0", " tok1", "[blocked]"], "{types:?}");
    assert_eq!(types.last().map(String::as_str), Some("message_stop"), "{types:?}");
}
