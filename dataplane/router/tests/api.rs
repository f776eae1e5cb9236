//! The router's HTTP API against runner stand-ins over real gRPC: wire shapes, errors for bad
//! input, authentication, event streams, cancellation, shedding, deadlines, fallbacks and the
//! per-tenant prefix-cache salt.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use mantle_awswire::eventstream::Decoder;
use mantle_awswire::sigv4::{self, Secret};
use mantle_router::inference::Inference;
use mantle_router::test_support::{RunningStandIn, StandInConfig, stand_in};
use mantle_router::{AuthConfig, Platform, RouterConfig, RunnerSpec};
use serde_json::{Value, json};
use tower::ServiceExt;

mod support;

use support::{json_of, model, post, send};

const TEXT: &str = "acme.text-v1:0";
const BACKUP: &str = "acme.backup-v1:0";
const EMBED: &str = "acme.embed-v1:0";
const OLD: &str = "acme.old-v1:0";
const MISTRAL: &str = "acme.mistral-v1:0";

struct Fixture {
    app: axum::Router,
    inference: Arc<Inference>,
    text: RunningStandIn,
    others: Vec<RunningStandIn>,
}

struct Options {
    text: StandInConfig,
    backup: StandInConfig,
    config: RouterConfig,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            text: StandInConfig::default(),
            backup: StandInConfig::default(),
            config: RouterConfig::local("127.0.0.1:0".parse().unwrap()),
        }
    }
}

async fn fixture(options: Options) -> Fixture {
    let text = stand_in(options.text).await;
    let backup = stand_in(options.backup).await;
    let embed = stand_in(StandInConfig::default()).await;
    let runner = |model: &str, s: &RunningStandIn| RunnerSpec {
        model: model.into(),
        address: s.address(),
        pool: None,
        cell: None,
    };
    let platform = Platform {
        models: vec![
            model(TEXT, "TEXT", "  fallbacks: [{modelId: acme.backup-v1:0, on: UNAVAILABLE}]\n"),
            model(BACKUP, "TEXT", ""),
            model(EMBED, "EMBEDDING", ""),
            model(OLD, "TEXT", "  lifecycle: {status: LEGACY, endOfLife: '2020-01-01T00:00:00Z'}\n"),
            model(MISTRAL, "TEXT", "  invokeModelBody: Mistral\n"),
        ],
        provisioned: Vec::new(),
        runners: vec![
            runner(TEXT, &text),
            runner(BACKUP, &backup),
            runner(EMBED, &embed),
            runner(OLD, &backup),
            runner(MISTRAL, &backup),
        ],
        cells: Vec::new(),
    };
    let (app, inference) = mantle_router::build(&options.config, platform).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ![TEXT, BACKUP, EMBED, MISTRAL].iter().all(|m| inference.live().runners.ready(m)) {
        assert!(Instant::now() < deadline, "stand-ins never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the capacity loop see the ready runners.
    tokio::time::sleep(Duration::from_millis(150)).await;
    Fixture { app, inference, text, others: vec![backup, embed] }
}

fn converse_body(text: &str) -> String {
    json!({"messages": [{"role": "user", "content": [{"text": text}]}], "inferenceConfig": {"maxTokens": 16}})
        .to_string()
}

#[tokio::test]
async fn converse_answers_with_usage_and_a_request_id_that_reaches_the_runner() {
    let f = fixture(Options::default()).await;
    let (status, headers, body) = send(&f.app, post("/model/acme.text-v1%3A0/converse", converse_body("Hi"))).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let reply = json_of(&body);
    assert_eq!(reply["output"]["message"]["content"][0]["text"], " tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7");
    assert_eq!(reply["usage"]["outputTokens"], 8);
    assert_eq!(reply["stopReason"], "end_turn");
    let id = headers["x-amzn-RequestId"].to_str().unwrap();
    assert_eq!(*f.text.counters.last_request_id.lock().unwrap(), id);
    assert_eq!(headers["x-mantle-model-used"], TEXT);
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_error_type() {
    let mut options = Options::default();
    options.config.limits.max_request_bytes = 4096;
    let f = fixture(options).await;
    let converse = "/model/acme.text-v1%3A0/converse";
    let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
        ("malformed JSON", post(converse, "{\"messages\": ["), StatusCode::BAD_REQUEST, "ValidationException"),
        ("missing messages", post(converse, "{}"), StatusCode::BAD_REQUEST, "ValidationException"),
        (
            "unknown content block",
            post(converse, json!({"messages": [{"role": "user", "content": [{"hologram": {}}]}]}).to_string()),
            StatusCode::BAD_REQUEST,
            "ValidationException",
        ),
        (
            "unknown field in inferenceConfig",
            post(converse, json!({"messages": [{"role": "user", "content": [{"text": "x"}]}], "inferenceConfig": {"topK": 5}}).to_string()),
            StatusCode::BAD_REQUEST,
            "ValidationException",
        ),
        (
            "unknown top-level field, streaming",
            post("/model/acme.text-v1%3A0/converse-stream", json!({"messages": [{"role": "user", "content": [{"text": "x"}]}], "temprature": 0}).to_string()),
            StatusCode::BAD_REQUEST,
            "ValidationException",
        ),
        (
            "wrong content type",
            Request::post(converse).header("content-type", "text/plain").body(Body::from(converse_body("x"))).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "ValidationException",
        ),
        ("body over the limit", post(converse, vec![b' '; 5000]), StatusCode::PAYLOAD_TOO_LARGE, "ValidationException"),
        (
            "invalid UTF-8",
            post(converse, b"{\"messages\": [{\"role\": \"user\", \"content\": [{\"text\": \"\xff\xfe\"}]}]}".to_vec()),
            StatusCode::BAD_REQUEST,
            "ValidationException",
        ),
        ("unknown model", post("/model/acme.nope-v1%3A0/converse", converse_body("x")), StatusCode::NOT_FOUND, "ResourceNotFoundException"),
        ("past end of life", post("/model/acme.old-v1%3A0/converse", converse_body("x")), StatusCode::BAD_REQUEST, "ValidationException"),
        (
            "max tokens beyond the context",
            post(converse, json!({"messages": [{"role": "user", "content": [{"text": "x"}]}], "inferenceConfig": {"maxTokens": 100000}}).to_string()),
            StatusCode::BAD_REQUEST,
            "ValidationException",
        ),
        ("invoke with a non-JSON body", post("/model/acme.text-v1%3A0/invoke", "prompt=hi"), StatusCode::BAD_REQUEST, "ValidationException"),
        (
            "embedding model asked to converse",
            post("/model/acme.embed-v1%3A0/converse", converse_body("x")),
            StatusCode::BAD_REQUEST,
            "ValidationException",
        ),
        ("unknown operation", post("/model/acme.text-v1%3A0/transmogrify", "{}"), StatusCode::NOT_FOUND, "UnknownOperationException"),
    ];
    for (name, request, status, kind) in cases {
        let (got, headers, body) = send(&f.app, request).await;
        assert_eq!(got, status, "{name}: {}", String::from_utf8_lossy(&body));
        assert_eq!(headers["x-amzn-ErrorType"], kind, "{name}");
        assert!(headers.contains_key("x-amzn-RequestId"), "{name}");
        assert!(!json_of(&body)["message"].as_str().unwrap_or_default().is_empty(), "{name}");
    }
    // An unknown field is refused by its path, as Bedrock refuses it.
    let body = json!({"messages": [{"role": "user", "content": [{"text": "x", "cache": true}]}]});
    let (_, _, reply) = send(&f.app, post(converse, body.to_string())).await;
    let message = json_of(&reply)["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("messages[0].content[0].cache: unknown field `cache`"), "{message}");
    // OpenAI clients get OpenAI's error shape.
    let (status, _, body) = send(&f.app, post("/v1/chat/completions", "{\"model\": 3}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json_of(&body)["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn openai_clients_get_openais_wire_details() {
    let f = fixture(Options::default()).await;
    // An unknown URL is OpenAI's `unknown_url`, not a missing model.
    let (status, headers, body) = send(&f.app, post("/v1/responses", "{}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let error = &json_of(&body)["error"];
    assert_eq!((error["code"].as_str(), error["type"].as_str()), (Some("unknown_url"), Some("invalid_request_error")));
    assert!(error["message"].as_str().unwrap().contains("POST /v1/responses"), "{error}");
    // Every response carries x-request-id, the same id as x-amzn-RequestId.
    assert_eq!(headers["x-request-id"], headers["x-amzn-RequestId"]);
    let chat = json!({"model": TEXT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (status, headers, _) = send(&f.app, post("/v1/chat/completions", chat.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-request-id"], headers["x-amzn-RequestId"]);
    // An unknown field is named; one at its default passes; one set otherwise is refused.
    for (extra, status, says) in [
        (json!({"temprature": 0}), StatusCode::BAD_REQUEST, "Unrecognized request argument supplied: temprature"),
        (json!({"presence_penalty": 0, "n": 1, "user": "u"}), StatusCode::OK, ""),
        (json!({"presence_penalty": 1.5}), StatusCode::BAD_REQUEST, "presence_penalty is not supported"),
    ] {
        let mut body = chat.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (got, _, reply) = send(&f.app, post("/v1/chat/completions", body.to_string())).await;
        assert_eq!(got, status, "{extra}: {}", String::from_utf8_lossy(&reply));
        let message = json_of(&reply)["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(message.starts_with(says), "{extra}: {message}");
    }
    // Nothing may follow the JSON body, in either dialect.
    let (status, _, _) = send(&f.app, post("/v1/chat/completions", format!("{chat} {{}}"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let converse = format!("{} trailing", converse_body("x"));
    let (status, headers, body) = send(&f.app, post("/model/acme.text-v1%3A0/converse", converse)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-amzn-ErrorType"], "ValidationException");
}

#[tokio::test]
async fn openai_chat_returns_logprobs_in_openais_shape() {
    let f = fixture(Options::default()).await;
    let chat =
        json!({"model": TEXT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": true});
    let (status, _, body) = send(&f.app, post("/v1/chat/completions", chat.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let content = json_of(&body)["choices"][0]["logprobs"]["content"].clone();
    assert_eq!(content.as_array().map(Vec::len), Some(3), "{content}");
    // The stand-in's tokens are " tok0", " tok1", ... at -0.25, -0.5, ...
    assert_eq!(content[1], json!({"token": " tok1", "logprob": -0.5, "bytes": b" tok1".to_vec(), "top_logprobs": []}));
    // Streamed, each content chunk carries its own tokens.
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (status, _, body) = send(&f.app, post("/v1/chat/completions", streamed.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let tokens: Vec<Value> = std::str::from_utf8(&body)
        .unwrap()
        .split("\n\n")
        .filter_map(|e| serde_json::from_str::<Value>(e.trim_start_matches("data: ")).ok())
        .filter(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()))
        .flat_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(tokens.len(), 3);
    assert_eq!(tokens[2]["token"], " tok2");
    // Without logprobs the field stays null.
    let plain = json!({"model": TEXT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let (_, _, body) = send(&f.app, post("/v1/chat/completions", plain.to_string())).await;
    assert!(json_of(&body)["choices"][0]["logprobs"].is_null());
    // Alternatives, most likely first, when asked for; more than OpenAI allows is refused.
    let mut top = chat.clone();
    top["top_logprobs"] = json!(2);
    top["stream"] = json!(false);
    let (status, _, body) = send(&f.app, post("/v1/chat/completions", top.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let content = json_of(&body)["choices"][0]["logprobs"]["content"].clone();
    assert_eq!(content[1]["top_logprobs"].as_array().map(Vec::len), Some(2), "{content}");
    assert_eq!(content[1]["top_logprobs"][0]["token"], content[1]["token"]);
    top["top_logprobs"] = json!(21);
    let (status, _, body) = send(&f.app, post("/v1/chat/completions", top.to_string())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(json_of(&body)["error"]["message"].as_str().unwrap().starts_with("top_logprobs must be"));
}

#[tokio::test]
async fn model_ids_arrive_percent_encoded_as_ids_or_arns() {
    let f = fixture(Options::default()).await;
    for path in [
        "/model/acme.text-v1%3A0/converse",
        "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A%3Afoundation-model%2Facme.text-v1%3A0/converse",
        "/model/us.acme.text-v1%3A0/converse",
    ] {
        let (status, _, body) = send(&f.app, post(path, converse_body("x"))).await;
        assert_eq!(status, StatusCode::OK, "{path}: {}", String::from_utf8_lossy(&body));
    }
}

fn keys_file() -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("mantle-keys-{}-{:?}.yaml", std::process::id(), std::thread::current().id()));
    std::fs::write(
        &path,
        "tenants:\n  - name: acme\n    accessKeys: [{accessKeyId: AKIDACME, secretAccessKey: s3cret}]\n    apiKeys: [mk-acme-0123456789abcdef]\n  - name: tiny\n    tokensPerMinute: 10\n    burstTokens: 10\n    apiKeys: [mk-tiny-0123456789abcdef]\n",
    )
    .unwrap();
    path
}

fn signed(path: &str, body: &str, at: SystemTime, secret: &str) -> Request<Body> {
    let date = sigv4::amz_date(at);
    let headers = [("host", "localhost"), ("x-amz-date", date.as_str()), ("content-type", "application/json")];
    let view = sigv4::Request { method: "POST", path, query: "", headers: &headers, body: body.as_bytes() };
    let authorization = sigv4::sign(&view, "AKIDACME", &Secret::new(secret), "us-east-1", "bedrock").unwrap();
    Request::post(path)
        .header("host", "localhost")
        .header("x-amz-date", date)
        .header("content-type", "application/json")
        .header("authorization", authorization)
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn sigv4_and_api_keys_are_checked_when_auth_is_on() {
    let mut options = Options::default();
    options.config.auth = AuthConfig::File(keys_file());
    let f = fixture(options).await;
    let path = "/model/acme.text-v1%3A0/converse";
    let body = converse_body("x");
    let (status, _, text) = send(&f.app, signed(path, &body, SystemTime::now(), "s3cret")).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&text));
    // Each failure carries the exception AWS answers with, which botocore surfaces as the code.
    for (name, request, kind) in [
        ("wrong secret", signed(path, &body, SystemTime::now(), "guess"), "InvalidSignatureException"),
        (
            "expired",
            signed(path, &body, SystemTime::now() - Duration::from_secs(600), "s3cret"),
            "InvalidSignatureException",
        ),
        ("unsigned", post(path, body.clone()), "MissingAuthenticationTokenException"),
    ] {
        let (status, headers, _) = send(&f.app, request).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{name}");
        assert_eq!(headers["x-amzn-ErrorType"], kind, "{name}");
    }
    let chat = json!({"model": TEXT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}).to_string();
    let bearer = |key: &str| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::from(chat.clone()))
            .unwrap()
    };
    assert_eq!(send(&f.app, bearer("mk-acme-0123456789abcdef")).await.0, StatusCode::OK);
    assert_eq!(send(&f.app, bearer("mk-wrong")).await.0, StatusCode::UNAUTHORIZED);
    // The tiny tenant's bucket (10 tokens a minute, twice that while the runners are healthy) holds
    // one request of ~16 tokens (input + a quarter of max_tokens).
    let (first, ..) = send(&f.app, bearer("mk-tiny-0123456789abcdef")).await;
    let (second, headers, body) = send(&f.app, bearer("mk-tiny-0123456789abcdef")).await;
    assert_eq!(first, StatusCode::OK);
    assert_eq!(second, StatusCode::TOO_MANY_REQUESTS, "{}", String::from_utf8_lossy(&body));
    assert!(headers.contains_key("retry-after"));
}

/// Sends a request as the holder of API key `key`: the status, the body, and the cache salt
/// the runner was given.
async fn call(f: &Fixture, key: &str, path: &str, body: String, salt: Option<&str>) -> (StatusCode, Bytes, String) {
    let mut request =
        Request::post(path).header("content-type", "application/json").header("authorization", format!("Bearer {key}"));
    if let Some(salt) = salt {
        request = request.header("x-mantle-cache-salt", salt);
    }
    let (status, _, body) = send(&f.app, request.body(Body::from(body)).unwrap()).await;
    (status, body, f.text.counters.last_cache_salt.lock().unwrap().clone())
}

/// Every request's runner cache salt names its tenant, so two tenants sending the same prompt
/// never share cached blocks (nor learn of each other's prompts from cache hits); a caller's
/// own salt (header or OpenAI body field) splits its tenant's namespace further.
#[tokio::test]
async fn the_runner_cache_salt_differs_between_tenants_and_takes_the_callers_salt() {
    let keys = std::env::temp_dir().join(format!("mantle-salt-keys-{}.yaml", std::process::id()));
    std::fs::write(
        &keys,
        "tenants:\n  - name: acme\n    apiKeys: [mk-acme-0123456789abcdef]\n  - name: globex\n    apiKeys: [mk-globex-0123456789abcdef]\n",
    )
    .unwrap();
    let mut options = Options::default();
    options.config.auth = AuthConfig::File(keys.clone());
    let f = fixture(options).await;
    let chat = json!({"model": TEXT, "messages": [{"role": "user", "content": "the same confidential prompt"}], "max_tokens": 4});
    let (acme, globex) = ("mk-acme-0123456789abcdef", "mk-globex-0123456789abcdef");
    let chat_path = "/v1/chat/completions";
    let converse_path = &format!("/model/{TEXT}/converse");

    let (status, body, a) = call(&f, acme, chat_path, chat.to_string(), None).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (_, _, g) = call(&f, globex, chat_path, chat.to_string(), None).await;
    assert!(!a.is_empty() && !g.is_empty());
    assert_ne!(a, g, "two tenants must not share a prefix-cache namespace");
    let (_, _, again) = call(&f, acme, chat_path, chat.to_string(), None).await;
    assert_eq!(a, again, "one tenant keeps its namespace");
    let (_, _, converse) = call(&f, acme, converse_path, converse_body("x"), None).await;
    assert_eq!(a, converse, "on every API");

    // The caller's own salt, from the header (both APIs) or OpenAI's body field.
    let (status, _, team) = call(&f, acme, chat_path, chat.to_string(), Some("team-1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(team, a);
    let mut with_body_salt = chat.clone();
    with_body_salt["cache_salt"] = json!("team-1");
    assert_eq!(call(&f, acme, chat_path, with_body_salt.to_string(), None).await.2, team);
    assert_eq!(call(&f, acme, converse_path, converse_body("x"), Some("team-1")).await.2, team);
    let (_, _, globex_team) = call(&f, globex, converse_path, converse_body("x"), Some("team-1")).await;
    assert_ne!(globex_team, team, "the same caller salt in another tenant is another namespace");

    // Bounded, and one source at a time.
    let long = "s".repeat(257);
    for (path, body, salt) in [
        (converse_path.as_str(), converse_body("x"), Some(long.as_str())),
        (chat_path, chat.to_string(), Some(long.as_str())),
        (chat_path, json!({"cache_salt": long, "model": TEXT, "messages": chat["messages"]}).to_string(), None),
        (chat_path, with_body_salt.to_string(), Some("team-2")),
    ] {
        let (status, body, _) = call(&f, acme, path, body, salt).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {}", String::from_utf8_lossy(&body));
    }
    std::fs::remove_file(keys).ok();
}

async fn read_frames(body: Body, limit: usize) -> Vec<(String, Value)> {
    let mut decoder = Decoder::new();
    let mut frames = Vec::new();
    let mut body = body;
    while frames.len() < limit {
        let Some(frame) = body.frame().await else { break };
        if let Ok(data) = frame.unwrap().into_data() {
            decoder.push(&data);
        }
        while let Some(message) = decoder.next_message().unwrap() {
            let kind = message
                .header(":event-type")
                .or_else(|| message.header(":exception-type"))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string();
            frames.push((kind, serde_json::from_slice(&message.payload).unwrap_or(Value::Null)));
        }
    }
    frames
}

#[tokio::test]
async fn converse_stream_sends_checksummed_events_in_order() {
    let f = fixture(Options::default()).await;
    let response =
        f.app.clone().oneshot(post("/model/acme.text-v1%3A0/converse-stream", converse_body("x"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/vnd.amazon.eventstream");
    let frames = read_frames(response.into_body(), usize::MAX).await;
    let kinds: Vec<&str> = frames.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"messageStart"));
    assert_eq!(kinds.iter().filter(|k| **k == "contentBlockDelta").count(), 8);
    assert_eq!(kinds[kinds.len() - 3..], ["contentBlockStop", "messageStop", "metadata"]);
    assert_eq!(frames.last().unwrap().1["usage"]["outputTokens"], 8);
}

#[tokio::test]
async fn invoke_with_response_stream_sends_base64_model_chunks() {
    let f = fixture(Options::default()).await;
    let body = json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let request = post("/model/acme.text-v1%3A0/invoke-with-response-stream", body.to_string());
    let response = f.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.headers()["x-amzn-bedrock-content-type"], "application/json");
    let chunks: Vec<Value> = read_frames(response.into_body(), usize::MAX)
        .await
        .into_iter()
        .map(|(kind, payload)| {
            assert_eq!(kind, "chunk");
            let bytes = base64::engine::general_purpose::STANDARD.decode(payload["bytes"].as_str().unwrap()).unwrap();
            serde_json::from_slice(&bytes).unwrap()
        })
        .collect();
    let types: Vec<&str> = chunks.iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(chunks[8]["amazon-bedrock-invocationMetrics"]["outputTokenCount"], 4);
}

#[tokio::test]
async fn a_timeout_mid_stream_is_named_by_a_member_of_each_streams_union_and_not_billed() {
    let metering = std::env::temp_dir().join(format!("mantle-stream-error-metering-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&metering);
    let mut config = RouterConfig::local("127.0.0.1:0".parse().unwrap());
    config.metering = Some(metering.clone());
    let f = fixture(Options {
        text: StandInConfig { fail_after: Some((2, tonic::Code::DeadlineExceeded)), ..Default::default() },
        config,
        ..Default::default()
    })
    .await;
    // ConverseStreamOutput has no modelTimeoutException: botocore would see no code at all.
    let response =
        f.app.clone().oneshot(post("/model/acme.text-v1%3A0/converse-stream", converse_body("x"))).await.unwrap();
    let frames = read_frames(response.into_body(), usize::MAX).await;
    let (kind, payload) = frames.last().unwrap();
    assert_eq!(kind, "modelStreamErrorException", "{frames:?}");
    assert_eq!(payload["originalStatusCode"], 408);
    assert!(payload["message"].as_str().unwrap().contains("mid-stream"), "{payload}");
    // ResponseStream models it.
    let body = json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
    let request = post("/model/acme.text-v1%3A0/invoke-with-response-stream", body.to_string());
    let response = f.app.clone().oneshot(request).await.unwrap();
    let frames = read_frames(response.into_body(), usize::MAX).await;
    assert_eq!(frames.last().unwrap().0, "modelTimeoutException", "{frames:?}");
    // Each request is settled once, with the tokens it streamed, at no cost: the failure was ours.
    let records = support::read_metering(&metering, 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    for r in &records {
        assert_eq!((r["outputTokens"].as_u64(), r["cost"].as_f64()), (Some(2), Some(0.0)), "{r}");
        assert_ne!(r["outcome"], "cancelled", "{r}");
    }
    std::fs::remove_file(metering).ok();
}

#[tokio::test]
async fn invoke_model_reads_and_answers_the_body_of_the_models_declared_family() {
    let f = fixture(Options::default()).await;
    // {prompt, temperature, top_p} fits Llama and Mistral alike: the model's family decides.
    let body = json!({"prompt": "<s>[INST] Hi [/INST]", "temperature": 0.5, "top_p": 0.9}).to_string();
    let (status, _, reply) = send(&f.app, post("/model/acme.mistral-v1%3A0/invoke", body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply));
    let reply = json_of(&reply);
    assert!(reply.get("generation").is_none(), "{reply}");
    assert_eq!(reply["outputs"][0]["text"], " tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7", "{reply}");
    assert!(reply["outputs"][0]["stop_reason"].is_string(), "{reply}");
    // A Llama key is not a Mistral key.
    let llama = json!({"prompt": "Hi", "max_gen_len": 8}).to_string();
    let (status, headers, reply) = send(&f.app, post("/model/acme.mistral-v1%3A0/invoke", llama)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["x-amzn-ErrorType"], "ValidationException");
    let message = json_of(&reply)["message"].as_str().unwrap().to_string();
    assert!(message.contains("extraneous key [max_gen_len]") && message.contains("Mistral"), "{message}");
    // A model that declares nothing and has no Bedrock provider prefix takes Anthropic messages.
    let (status, _, reply) = send(&f.app, post("/model/acme.text-v1%3A0/invoke", body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&reply).contains("extraneous key [prompt]"));
}

#[tokio::test]
async fn embedding_options_are_honoured_or_refused_with_a_reason() {
    let f = fixture(Options::default()).await;
    let invoke = "/model/acme.embed-v1%3A0/invoke";
    // The stand-in's vectors are [len, 1, 0]: three dimensions, normalised on the way out.
    let body = json!({"inputText": "abcd", "dimensions": 3, "normalize": true, "embeddingTypes": ["float"]});
    let (status, _, reply) = send(&f.app, post(invoke, body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply));
    let reply = json_of(&reply);
    let v: Vec<f64> = serde_json::from_value(reply["embeddingsByType"]["float"].clone()).unwrap();
    assert!((v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-5, "{v:?}");
    // A width the model does not make is refused before any work reaches a runner.
    let embeds = || f.others[1].counters.embeds.load(std::sync::atomic::Ordering::Relaxed);
    let before = embeds();
    for (body, says) in [
        (json!({"inputText": "abcd", "dimensions": 256}), "dimensions 256 is not supported"),
        (json!({"inputText": "abcd", "normalize": false}), "normalize false"),
        (json!({"texts": ["abcd"]}), "extraneous key [texts]"),
    ] {
        let (status, _, reply) = send(&f.app, post(invoke, body.to_string())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(String::from_utf8_lossy(&reply).contains(says), "{}", String::from_utf8_lossy(&reply));
    }
    let openai = |body: Value| post("/v1/embeddings", body.to_string());
    let (status, _, reply) = send(&f.app, openai(json!({"model": EMBED, "input": "abcd", "dimensions": 3}))).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply));
    let (status, _, reply) = send(&f.app, openai(json!({"model": EMBED, "input": "abcd", "dimensions": 2}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = &json_of(&reply)["error"];
    assert!(error["message"].as_str().unwrap().contains("Matryoshka"), "{error}");
    assert_eq!(embeds(), before + 1, "only the request with the right width reached the runner");
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_runner_stream() {
    let f = fixture(Options {
        text: StandInConfig { tokens: 500, interval: Duration::from_millis(10), ..Default::default() },
        ..Default::default()
    })
    .await;
    let body =
        json!({"messages": [{"role": "user", "content": [{"text": "x"}]}], "inferenceConfig": {"maxTokens": 500}});
    let response =
        f.app.clone().oneshot(post("/model/acme.text-v1%3A0/converse-stream", body.to_string())).await.unwrap();
    let mut body = response.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    assert_eq!(f.text.counters.active.load(Ordering::Relaxed), 1);
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(1);
    while f.text.counters.cancelled.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the runner stream outlived its client");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(f.text.counters.active.load(Ordering::Relaxed), 0);
    let metrics = f.inference.metrics.render();
    assert!(
        metrics.contains(
            "mantle_router_requests_total{api=\"ConverseStream\",model=\"acme.text-v1:0\",outcome=\"cancelled\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn overload_is_shed_at_once_with_retry_after() {
    let mut options = Options {
        text: StandInConfig { tokens: 50, interval: Duration::from_millis(20), ..Default::default() },
        ..Default::default()
    };
    options.config.path.slots_per_runner = 2;
    let f = fixture(options).await;
    let mut waiting = Vec::new();
    // Two slots in the small lane (half of... at least one), four queued per slot: flood it.
    for _ in 0..40 {
        let app = f.app.clone();
        waiting.push(tokio::spawn(async move {
            let started = Instant::now();
            let (status, headers, _) = send(&app, post("/model/acme.text-v1%3A0/converse", converse_body("x"))).await;
            (status, headers, started.elapsed())
        }));
    }
    let mut shed = 0;
    let mut ok = 0;
    for w in waiting {
        let (status, headers, took) = w.await.unwrap();
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                shed += 1;
                assert_eq!(headers["x-amzn-ErrorType"], "ThrottlingException");
                assert!(headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
                assert!(headers["x-mantle-capacity"].to_str().unwrap().starts_with("slots=2;"), "{headers:?}");
                assert!(took < Duration::from_millis(500), "shed after {took:?}: refusals must be immediate");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(shed > 0 && ok > 0, "ok {ok}, shed {shed}");
}

#[tokio::test]
async fn a_deadline_the_queue_cannot_meet_is_refused_with_408() {
    let mut options = Options {
        text: StandInConfig { tokens: 100, interval: Duration::from_millis(20), ..Default::default() },
        ..Default::default()
    };
    options.config.path.slots_per_runner = 1;
    let f = fixture(options).await;
    // Occupy the only slot.
    let app = f.app.clone();
    let busy = tokio::spawn(async move {
        let body =
            json!({"messages": [{"role": "user", "content": [{"text": "x"}]}], "inferenceConfig": {"maxTokens": 100}});
        send(&app, post("/model/acme.text-v1%3A0/converse", body.to_string())).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let request = Request::post("/model/acme.text-v1%3A0/converse")
        .header("content-type", "application/json")
        .header("x-amz-bedrock-deadline-ms", "50")
        .body(Body::from(converse_body("x")))
        .unwrap();
    let (status, headers, body) = send(&f.app, request).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-amzn-ErrorType"], "ModelTimeoutException");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(busy.await.unwrap().0, StatusCode::OK);
}

#[tokio::test]
async fn an_unavailable_model_falls_back_and_says_which_model_answered() {
    let f = fixture(Options {
        text: StandInConfig { fail_with: Some(tonic::Code::Unavailable), ..Default::default() },
        ..Default::default()
    })
    .await;
    let (status, headers, body) = send(&f.app, post("/model/acme.text-v1%3A0/converse", converse_body("x"))).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-mantle-model-used"], BACKUP);
    // A model without a fallback reports the failure.
    let f = fixture(Options {
        backup: StandInConfig { fail_with: Some(tonic::Code::Unavailable), ..Default::default() },
        ..Default::default()
    })
    .await;
    let (status, headers, _) = send(&f.app, post("/model/acme.backup-v1%3A0/converse", converse_body("x"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-amzn-ErrorType"], "ServiceUnavailableException");
}

#[tokio::test]
async fn openai_chat_streams_server_sent_events_and_embeddings_work() {
    let f = fixture(Options::default()).await;
    let chat = json!({"model": TEXT, "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    let (status, headers, body) = send(&f.app, post("/v1/chat/completions", chat.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    let events: Vec<&str> = std::str::from_utf8(&body).unwrap().split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let usage: Value = serde_json::from_str(events[events.len() - 2].trim_start_matches("data: ")).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    let (status, _, body) =
        send(&f.app, post("/v1/embeddings", json!({"model": EMBED, "input": ["a", "bb"]}).to_string())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json_of(&body)["data"][1]["embedding"][0], 2.0);
    let (status, _, body) =
        send(&f.app, Request::get("/foundation-models?byOutputModality=EMBEDDING").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json_of(&body)["modelSummaries"][0]["modelId"], EMBED);
}

#[tokio::test]
async fn openai_completions_continue_prompts_and_score_them_with_echo() {
    let metering = std::env::temp_dir().join(format!("mantle-completions-metering-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&metering);
    let mut config = RouterConfig::local("127.0.0.1:0".parse().unwrap());
    config.metering = Some(metering.clone());
    let f = fixture(Options { config, ..Default::default() }).await;
    let complete = |body: Value| post("/v1/completions", body.to_string());
    // Scoring only: the prompt comes back with each token's log-probability, nothing generated.
    let body = json!({"model": TEXT, "prompt": "Hello world, hi", "echo": true, "logprobs": 1, "max_tokens": 0});
    let (status, _, reply) = send(&f.app, complete(body)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply));
    let reply = json_of(&reply);
    assert_eq!(reply["object"], "text_completion");
    let choice = &reply["choices"][0];
    assert_eq!((choice["text"].as_str(), choice["finish_reason"].as_str()), (Some("Hello world, hi"), Some("length")));
    let l = &choice["logprobs"];
    assert_eq!(l["tokens"], json!(["Hell", "o wo", "rld,", " hi"]));
    assert_eq!(l["token_logprobs"][0], Value::Null);
    assert_eq!(l["token_logprobs"][2], -1.02);
    assert_eq!(l["top_logprobs"][1], json!({"o wo": -1.01}));
    assert_eq!(l["text_offset"], json!([0, 4, 8, 12]));
    assert_eq!(reply["usage"]["completion_tokens"], 0);
    // Metered as answered: the token the runner generated to close the scoring is not billed.
    let records = support::read_metering(&metering, 1).await;
    assert_eq!(
        (records[0]["outputTokens"].as_u64(), records[0]["api"].as_str()),
        (Some(0), Some("Completions")),
        "{records:?}"
    );
    // Token-id prompts, two at once, continued: one choice each, in order.
    let body = json!({"model": TEXT, "prompt": [[5, 6, 7], [8, 9]], "echo": true, "logprobs": 2, "max_tokens": 2});
    let (status, _, reply) = send(&f.app, complete(body)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply));
    let reply = json_of(&reply);
    assert_eq!(reply["choices"][0]["text"], "<5><6><7> tok0 tok1");
    assert_eq!(reply["choices"][1]["text"], "<8><9> tok0 tok1");
    assert_eq!(reply["choices"][1]["index"], 1);
    assert_eq!(reply["choices"][1]["logprobs"]["tokens"], json!(["<8>", "<9>", " tok0", " tok1"]));
    assert_eq!(reply["choices"][0]["logprobs"]["top_logprobs"][1], json!({"<6>": -1.01, "<alt1>": -2.01}));
    assert_eq!(reply["usage"]["prompt_tokens"], 5);
    assert_eq!(reply["usage"]["completion_tokens"], 4);
    // Plain continuation: no logprobs, OpenAI's default of 16 tokens (the stand-in stops at 8).
    let (status, _, reply) = send(&f.app, complete(json!({"model": TEXT, "prompt": "Once"}))).await;
    assert_eq!(status, StatusCode::OK);
    let reply = json_of(&reply);
    assert_eq!(
        (reply["choices"][0]["logprobs"].clone(), reply["choices"][0]["finish_reason"].clone()),
        (Value::Null, json!("stop"))
    );
    assert!(reply["choices"][0]["text"].as_str().unwrap().starts_with(" tok0"));
    // Streamed: the echoed prompt first, then the text, the finish, the usage and [DONE].
    let body = json!({"model": TEXT, "prompt": "abcdefgh", "stream": true, "echo": true, "logprobs": 1,
        "max_tokens": 2, "stream_options": {"include_usage": true}});
    let (status, headers, reply) = send(&f.app, complete(body)).await;
    assert_eq!((status, &headers["content-type"]), (StatusCode::OK, &"text/event-stream".parse().unwrap()));
    let events: Vec<Value> = std::str::from_utf8(&reply)
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty() && *e != "data: [DONE]")
        .map(|e| serde_json::from_str(e.trim_start_matches("data: ")).unwrap())
        .collect();
    let texts: Vec<&str> = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(texts, ["abcdefgh", " tok0", " tok1", ""]);
    assert_eq!(events[0]["choices"][0]["logprobs"]["token_logprobs"], json!([null, -1.01]));
    assert_eq!(events[1]["choices"][0]["logprobs"]["tokens"], json!([" tok0"]));
    assert_eq!(events[3]["choices"][0]["finish_reason"], "length");
    assert_eq!(events[4]["usage"]["completion_tokens"], 2);
    assert!(std::str::from_utf8(&reply).unwrap().ends_with("data: [DONE]\n\n"));
    // Refusals are OpenAI's errors.
    for (body, says) in [
        (json!({"model": TEXT, "prompt": "x", "suffix": "y"}), "suffix"),
        (json!({"model": TEXT, "prompt": "x", "max_tokens": 0}), "only with echo"),
        (json!({"model": EMBED, "prompt": "x"}), "embedding model"),
    ] {
        let (status, _, reply) = send(&f.app, complete(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let message = json_of(&reply)["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(message.contains(says), "{message}");
    }
}

#[tokio::test]
async fn count_tokens_is_answered_and_spread_over_the_models_runners() {
    let (a, b) = (stand_in(StandInConfig::default()).await, stand_in(StandInConfig::default()).await);
    let runner = |s: &RunningStandIn| RunnerSpec { model: TEXT.into(), address: s.address(), pool: None, cell: None };
    let platform = Platform {
        models: vec![model(TEXT, "TEXT", "")],
        provisioned: Vec::new(),
        runners: vec![runner(&a), runner(&b)],
        cells: Vec::new(),
    };
    let (app, inference) =
        mantle_router::build(&RouterConfig::local("127.0.0.1:0".parse().unwrap()), platform).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while inference.live().runners.for_model(TEXT).iter().any(|r| !r.state().1) {
        assert!(Instant::now() < deadline, "stand-ins never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body =
        json!({"input": {"converse": {"messages": [{"role": "user", "content": [{"text": "How long is this?"}]}]}}});
    for _ in 0..40 {
        let (status, headers, reply) = send(&app, post(&format!("/model/{TEXT}/count-tokens"), body.to_string())).await;
        assert_eq!(status, StatusCode::OK, "{reply:?}");
        assert!(headers.contains_key("x-amzn-requestid"));
        assert!(json_of(&reply)["inputTokens"].as_u64().is_some_and(|n| n > 0));
    }
    let counts = [&a, &b].map(|s| s.counters.count_tokens.load(Ordering::Relaxed));
    assert_eq!(counts.iter().sum::<u64>(), 40);
    assert!(counts.iter().all(|&n| n > 0), "one runner took every count: {counts:?}");
    // A malformed input is the caller's error, answered without a runner: none set, or a member
    // CountTokens' Converse input does not define.
    let (status, headers, _) = send(&app, post(&format!("/model/{TEXT}/count-tokens"), r#"{"input": {}}"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["x-amzn-errortype"], "ValidationException");
    let mut body = body;
    body["input"]["converse"]["inferenceConfig"] = json!({"maxTokens": 5});
    let (status, headers, reply) = send(&app, post(&format!("/model/{TEXT}/count-tokens"), body.to_string())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["x-amzn-errortype"], "ValidationException");
    let message = json_of(&reply)["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("input.converse.inferenceConfig: unknown field `inferenceConfig`"), "{message}");
    // Input that cannot fit the model's context is refused before a runner tokenizes it.
    let long =
        json!({"input": {"converse": {"messages": [{"role": "user", "content": [{"text": "x".repeat(200_000)}]}]}}});
    let (status, headers, reply) = send(&app, post(&format!("/model/{TEXT}/count-tokens"), long.to_string())).await;
    assert_eq!(
        (status, &headers["x-amzn-errortype"]),
        (StatusCode::BAD_REQUEST, &"ValidationException".parse().unwrap())
    );
    assert!(String::from_utf8_lossy(&reply).contains("context is 4096 tokens"), "{reply:?}");
    assert_eq!([&a, &b].map(|s| s.counters.count_tokens.load(Ordering::Relaxed)).iter().sum::<u64>(), 40);
}

fn cell(name: &str, state: &str, shard: i32) -> mantle_crds::Cell {
    serde_norway::from_str(&format!(
        "apiVersion: mantle.dev/v1alpha1\nkind: Cell\nmetadata: {{name: {name}}}\nspec:\n  region: local\n  nodeSelector: {{mantle.dev/cell: {name}}}\n  state: {state}\n  shuffleShardSize: {shard}\n"
    ))
    .unwrap()
}

/// Cells from the platform (manifests or Kubernetes) steer traffic: a Disabled Cell's runners get
/// none, and a Cell's `shuffleShardSize` keeps each tenant on that many of its runners.
#[tokio::test]
async fn cells_steer_traffic_disabled_cells_get_none_and_tenants_keep_to_their_shard() {
    let stand_ins = [
        stand_in(StandInConfig::default()).await,
        stand_in(StandInConfig::default()).await,
        stand_in(StandInConfig::default()).await,
        stand_in(StandInConfig::default()).await,
    ];
    // Three runners in cell-a, one in cell-b.
    let cells_of = ["cell-a", "cell-a", "cell-a", "cell-b"];
    let platform = |cells: Vec<mantle_crds::Cell>| Platform {
        models: vec![model(TEXT, "TEXT", "")],
        provisioned: Vec::new(),
        runners: stand_ins
            .iter()
            .zip(cells_of)
            .map(|(s, c)| RunnerSpec { model: TEXT.into(), address: s.address(), pool: None, cell: Some(c.into()) })
            .collect(),
        cells,
    };
    let (app, inference) = mantle_router::build(
        &RouterConfig::local("127.0.0.1:0".parse().unwrap()),
        platform(vec![cell("cell-a", "Active", 1), cell("cell-b", "Disabled", 1)]),
    )
    .unwrap();
    assert_eq!(inference.live().runners.for_model(TEXT).len(), 3, "cell-b's runner is left out");
    // Until the model's admission capacity counts every runner served (16 slots each).
    let wait_ready = |runners: usize| {
        let inference = inference.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            let slots = format!("slots={}", 16 * runners);
            while !inference.capacity_header(TEXT).is_some_and(|h| h.starts_with(&format!("{slots};"))) {
                assert!(Instant::now() < deadline, "stand-ins never became ready");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_ready(3).await;
    let served = || stand_ins.each_ref().map(|s| s.counters.generates.load(Ordering::Relaxed));
    let converse = |n: usize| {
        let app = app.clone();
        async move {
            for _ in 0..n {
                let (status, _, reply) =
                    send(&app, post(&format!("/model/{TEXT}/converse"), converse_body("Hi"))).await;
                assert_eq!(status, StatusCode::OK, "{reply:?}");
            }
        }
    };
    converse(30).await;
    let counts = served();
    assert_eq!(counts[3], 0, "a Disabled Cell got traffic: {counts:?}");
    // shuffleShardSize 1: the (one, local) tenant keeps to one of cell-a's three runners.
    assert_eq!(counts.iter().filter(|&&n| n > 0).count(), 1, "{counts:?}");

    // cell-b back to Active, cell-a's shard widened to all three: every runner serves.
    inference.update(platform(vec![cell("cell-a", "Active", 3), cell("cell-b", "Active", 1)])).unwrap();
    wait_ready(4).await;
    let before = served();
    converse(60).await;
    let after = served();
    assert!(before.iter().zip(&after).all(|(b, a)| a > b), "{before:?} then {after:?}");
}

/// Batch workers present the batch token: their requests never draw on the tenant's token
/// buckets (a batch job is never throttled by quotas) and need no signature; a wrong token, or
/// any token when the router has none, is refused.
/// Batch tiers: STANDARD takes what real-time traffic leaves; ECONOMY (and SPOT) wait — a 503
/// the worker retries, never the model's fallback — while real-time requests hold over half the
/// model's slots, and start once the model is idle again; a tier that is not one is refused.
#[tokio::test]
async fn economy_batch_work_waits_for_idle_capacity_and_standard_does_not() {
    let mut options = Options::default();
    options.config.batch_token = Some("batch-0123456789".into());
    options.text = StandInConfig { tokens: 20, interval: Duration::from_millis(40), ..Default::default() };
    let f = fixture(options).await;
    let path = "/model/acme.text-v1%3A0/converse";
    let batch = |tier: &str| {
        Request::post(path)
            .header("content-type", "application/json")
            .header("x-mantle-batch-token", "batch-0123456789")
            .header("x-mantle-batch-tier", tier)
            .body(Body::from(converse_body("x")))
            .unwrap()
    };
    // Ten real-time requests on the runner's 16 slots.
    let mut real_time = Vec::new();
    for _ in 0..10 {
        let app = f.app.clone();
        real_time.push(tokio::spawn(async move { send(&app, post(path, converse_body("hi"))).await.0 }));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.text.counters.active.load(std::sync::atomic::Ordering::Relaxed) < 10 {
        assert!(Instant::now() < deadline, "the real-time requests did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, headers, body) = send(&f.app, batch("ECONOMY")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-amzn-ErrorType"], "ServiceUnavailableException");
    assert!(String::from_utf8_lossy(&body).contains("waits for idle capacity"));
    assert_eq!(send(&f.app, batch("SPOT")).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, body) = send(&f.app, batch("STANDARD")).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    for r in real_time {
        assert_eq!(r.await.unwrap(), StatusCode::OK);
    }
    let (status, _, body) = send(&f.app, batch("ECONOMY")).await;
    assert_eq!(status, StatusCode::OK, "idle again: {}", String::from_utf8_lossy(&body));
    // Batch work running is not real-time load: with six STANDARD records and five real-time
    // requests on the runner's 16 slots, real-time traffic holds under half of them, and an
    // ECONOMY record starts (each batch record counts as batch work until its answer ends).
    let mut running = Vec::new();
    let active = f.text.counters.clone();
    let started = |n: u32| {
        let active = active.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while active.active.load(std::sync::atomic::Ordering::Relaxed) < n {
                assert!(Instant::now() < deadline, "{n} requests did not start");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    for _ in 0..6 {
        let (app, request) = (f.app.clone(), batch("STANDARD"));
        running.push(tokio::spawn(async move { send(&app, request).await.0 }));
    }
    started(6).await;
    for _ in 0..5 {
        let app = f.app.clone();
        running.push(tokio::spawn(async move { send(&app, post(path, converse_body("hi"))).await.0 }));
    }
    started(11).await;
    let (status, _, body) = send(&f.app, batch("ECONOMY")).await;
    assert_eq!(status, StatusCode::OK, "beside batch work: {}", String::from_utf8_lossy(&body));
    for r in running {
        assert_eq!(r.await.unwrap(), StatusCode::OK);
    }
    let (status, _, body) = send(&f.app, batch("CHEAP")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&body));
}

#[tokio::test]
async fn batch_work_skips_the_tenants_token_buckets_and_needs_the_batch_token() {
    let mut options = Options::default();
    options.config.auth = AuthConfig::File(keys_file());
    options.config.batch_token = Some("batch-0123456789".into());
    let f = fixture(options).await;
    let path = "/model/acme.text-v1%3A0/converse";
    let batch = |token: &str| {
        Request::post(path)
            .header("content-type", "application/json")
            .header("x-mantle-batch-token", token)
            .header("x-mantle-batch-tenant", "tiny")
            .body(Body::from(converse_body("x")))
            .unwrap()
    };
    // The tiny tenant's bucket holds one such request a minute; its batch work is not limited.
    for i in 0..4 {
        let (status, _, body) = send(&f.app, batch("batch-0123456789")).await;
        assert_eq!(status, StatusCode::OK, "batch request {i}: {}", String::from_utf8_lossy(&body));
    }
    let (status, headers, _) = send(&f.app, batch("batch-guess")).await;
    assert_eq!(
        (status, &headers["x-amzn-ErrorType"]),
        (StatusCode::FORBIDDEN, &"AccessDeniedException".parse().unwrap())
    );

    let mut options = Options::default();
    options.config.auth = AuthConfig::File(keys_file());
    let f = fixture(options).await;
    assert_eq!(send(&f.app, batch("batch-0123456789")).await.0, StatusCode::FORBIDDEN, "no batch token configured");
}
