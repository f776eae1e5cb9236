//! The runner in front of a real OpenAI-compatible engine: llama.cpp's `llama-server` serving the
//! same SmolLM2 GGUF (built by `scripts/fetch-llama-server.sh`). Greedy output through the runner
//! equals the server's own; token counts equal its usage; a dropped stream frees its slot; a dead
//! server makes the runner CRITICAL and its requests UNAVAILABLE at once, and a restarted one is
//! used again.

use std::time::{Duration, Instant};

use mantle_engine::test_support::smollm2_path;
use mantle_proto::grammar::Kind;
use mantle_proto::runner_client::RunnerClient;
use mantle_proto::{
    ChatMessage, CountTokensRequest, EmbedRequest, FinishReason, GenerateRequest, Grammar, HealthRequest, InfoRequest,
    LoadState, generate_response,
};
use mantle_runner::test_support::{LlamaServer, http_status};
use mantle_runner::{RunnerConfig, RunningRunner};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

const MODEL_ID: &str = "huggingfacetb.smollm2-135m-instruct-v1:0";

async fn runner(upstream: &str, health_interval: Duration) -> (RunningRunner, RunnerClient<Channel>) {
    let mut config = RunnerConfig::external(upstream, MODEL_ID);
    if let Some(external) = config.external.as_mut() {
        external.health_interval = health_interval;
    }
    let runner = mantle_runner::start(config).await.expect("runner starts");
    let client = RunnerClient::connect(format!("http://{}", runner.grpc_addr)).await.expect("client connects");
    (runner, client)
}

fn chat(question: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: "external-test".into(),
        messages: vec![ChatMessage { role: "user".into(), content: question.into() }],
        max_tokens,
        ..Default::default()
    }
}

/// The streamed text and the Finished message.
async fn generate(
    client: &mut RunnerClient<Channel>,
    request: GenerateRequest,
) -> Result<(String, mantle_proto::Finished, Option<mantle_proto::Started>), tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let (mut text, mut started) = (String::new(), None);
    while let Some(message) = stream.next().await {
        match message?.event {
            Some(generate_response::Event::Started(s)) => started = Some(s),
            Some(generate_response::Event::Token(t)) => text.push_str(&t.text),
            Some(generate_response::Event::Finished(f)) => return Ok((text, f, started)),
            _ => {}
        }
    }
    panic!("the stream ended without Finished");
}

async fn post(url: String, body: Value) -> Value {
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("llama-server answers");
    assert!(response.status().is_success(), "{}", response.status());
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_output_and_token_counts_through_the_runner_equal_llama_servers_own() {
    let server = LlamaServer::start(&smollm2_path(), 2, 2).await;
    let (_runner, mut client) = runner(&server.url(), Duration::from_millis(500)).await;

    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.model_id.as_str(), info.modality.as_str()), (MODEL_ID, "TEXT"));
    assert_eq!(info.context_length, 2048, "llama-server's per-slot context");
    assert!(info.kernels.contains("llama.cpp"), "{}", info.kernels);

    let question = "What is the capital of France? Answer in one sentence.";
    let (text, finished, started) = generate(&mut client, chat(question, 24)).await.unwrap();
    let direct = post(
        format!("{}/v1/chat/completions", server.url()),
        json!({"messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0}),
    )
    .await;
    assert_eq!(text, direct["choices"][0]["message"]["content"].as_str().unwrap(), "greedy output is the server's");
    assert!(text.contains("Paris"), "{text}");
    let usage = finished.usage.unwrap();
    assert_eq!(usage.input_tokens as u64, direct["usage"]["prompt_tokens"].as_u64().unwrap());
    assert_eq!(usage.output_tokens as u64, direct["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(started.unwrap().input_tokens, usage.input_tokens, "Started carries the prompt tokens");

    let counted = client
        .count_tokens(CountTokensRequest {
            messages: vec![ChatMessage { role: "user".into(), content: question.into() }],
            prompt: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counted.input_tokens, usage.input_tokens, "CountTokens agrees with the server's usage");
    // A server without /tokenize (SGLang, Ollama), and no tokenizer in the runner: the count comes
    // from a one-token completion's usage.
    let mut generic = RunnerConfig::external(server.url(), MODEL_ID);
    if let Some(external) = generic.external.as_mut() {
        external.flavor = Some(mantle_runner::external::Flavor::Generic);
    }
    let generic = mantle_runner::start(generic).await.expect("runner starts");
    let mut generic_client = RunnerClient::connect(format!("http://{}", generic.grpc_addr)).await.unwrap();
    let request = CountTokensRequest {
        messages: vec![ChatMessage { role: "user".into(), content: question.into() }],
        prompt: String::new(),
    };
    let counted = generic_client.count_tokens(request).await.unwrap().into_inner();
    assert_eq!(counted.input_tokens, usage.input_tokens, "counted through a one-token completion");

    // A stop sequence from the middle of the greedy answer ends it there, without the sequence.
    let words: Vec<&str> = text.split_whitespace().collect();
    let stop = words[words.len() / 2].to_string();
    let at = text.find(&stop).unwrap();
    let mut stopped = chat(question, 24);
    stopped.stop_sequences = vec![stop.clone()];
    let (text_before, finished, _) = generate(&mut client, stopped).await.unwrap();
    assert_eq!(text_before, &text[..at]);
    assert_eq!((finished.reason(), finished.stop_sequence.as_str()), (FinishReason::StopSequence, stop.as_str()));

    // A raw prompt goes to /v1/completions, unchanged.
    let prompt = GenerateRequest { prompt: "The capital of France is".into(), max_tokens: 8, ..Default::default() };
    let (completion, finished, _) = generate(&mut client, prompt).await.unwrap();
    let direct = post(
        format!("{}/v1/completions", server.url()),
        json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(completion, direct["choices"][0]["text"].as_str().unwrap());
    assert_eq!(finished.reason(), FinishReason::MaxTokens);

    // What the server or the OpenAI API cannot do is refused with the reason.
    let err = generate(&mut client, chat(question, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut regex = chat(question, 8);
    regex.grammar = Some(Grammar { kind: Some(Kind::Regex("[0-9]+".into())) });
    let err = generate(&mut client, regex).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().contains("JSON Schema"), "{err:?}");
    let mut long = chat(&"word ".repeat(3000), 8);
    long.max_tokens = 8;
    let err = generate(&mut client, long).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "the server's 400 for a prompt over its context: {err:?}");
}

/// llama-server's slots in use.
async fn busy_slots(server: &LlamaServer) -> usize {
    let response = reqwest::get(format!("{}/slots", server.url())).await.unwrap();
    let slots: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    slots.as_array().unwrap().iter().filter(|s| s["is_processing"].as_bool().unwrap_or(false)).count()
}

/// Reads the Health stream until `want`, or panics after `within`; returns how long it took.
async fn await_state(client: &mut RunnerClient<Channel>, want: LoadState, within: Duration) -> Duration {
    let since = Instant::now();
    let mut health = client.health(HealthRequest {}).await.unwrap().into_inner();
    loop {
        let signal = tokio::time::timeout(within.saturating_sub(since.elapsed()), health.next())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} signal within {within:?}"))
            .unwrap()
            .unwrap();
        if signal.state() == want {
            return since.elapsed();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_its_slot_and_a_dead_upstream_is_critical_until_it_returns() {
    let mut server = LlamaServer::start(&smollm2_path(), 1, 2).await;
    let interval = Duration::from_millis(300);
    let (runner, mut client) = runner(&server.url(), interval).await;
    await_state(&mut client, LoadState::Healthy, Duration::from_secs(5)).await;
    assert_eq!(http_status(runner.http_addr.port(), "/readyz").await, Some(200));

    // Drop a long generation after a few tokens: the server stops it and frees the slot.
    let mut stream = client.generate(chat("Write a long story about a dragon.", 1000)).await.unwrap().into_inner();
    for _ in 0..4 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(busy_slots(&server).await, 1, "the generation is running");
    drop(stream);
    let dropped = Instant::now();
    while busy_slots(&server).await > 0 {
        assert!(dropped.elapsed() < Duration::from_secs(5), "the slot is still busy after the stream was dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Kill the server: CRITICAL within two intervals (plus one Health tick), requests fail at once.
    server.kill();
    await_state(&mut client, LoadState::Critical, 2 * interval + Duration::from_millis(200)).await;
    let tried = Instant::now();
    let err = generate(&mut client, chat("Hello?", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(tried.elapsed() < Duration::from_millis(500), "failed fast, not after a timeout");
    assert_eq!(http_status(runner.http_addr.port(), "/readyz").await, Some(503));

    // Start it again on the same port: the runner uses it again, without a restart.
    server.restart().await;
    await_state(&mut client, LoadState::Healthy, 2 * interval + Duration::from_secs(1)).await;
    let (text, _, _) = generate(&mut client, chat("What is the capital of France?", 12)).await.unwrap();
    assert!(!text.is_empty());
    assert_eq!(http_status(runner.http_addr.port(), "/readyz").await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_upstream_serves_unit_vectors_and_counts_their_tokens() {
    let server = LlamaServer::start_with(&smollm2_path(), 1, 2, &["--embeddings", "--pooling", "mean"]).await;
    let mut config = RunnerConfig::external(server.url(), "acme.smollm2-embed-v1:0");
    if let Some(external) = config.external.as_mut() {
        external.modality = mantle_runner::external::Modality::Embedding;
    }
    let runner = mantle_runner::start(config).await.expect("runner starts");
    let mut client = RunnerClient::connect(format!("http://{}", runner.grpc_addr)).await.unwrap();
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.modality.as_str(), info.embedding_dimensions), ("EMBEDDING", 576), "SmolLM2's hidden size");

    let texts = vec!["The cat sat on the mat.".to_string(), "Quarterly revenue grew.".to_string()];
    let embedded =
        client.embed(EmbedRequest { request_id: "e".into(), texts: texts.clone() }).await.unwrap().into_inner();
    assert_eq!(embedded.embeddings.len(), 2);
    for e in &embedded.embeddings {
        let norm: f32 = e.values.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "L2-normalised: {norm}");
    }
    let direct = post(format!("{}/v1/embeddings", server.url()), json!({"input": texts})).await;
    assert_eq!(embedded.input_tokens as u64, direct["usage"]["prompt_tokens"].as_u64().unwrap());
    let counted = client
        .count_tokens(CountTokensRequest { messages: Vec::new(), prompt: texts[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(counted.input_tokens > 3 && counted.input_tokens < embedded.input_tokens, "{counted:?}");
    let err = client.generate(chat("Hello", 4)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "Generate on an embedding model: {err:?}");
    let err = client.embed(EmbedRequest { request_id: "e".into(), texts: Vec::new() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
