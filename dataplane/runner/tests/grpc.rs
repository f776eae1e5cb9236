//! The runner over real gRPC with the real SmolLM2 model: streamed tokens, cancellation that
//! frees KV blocks, health signals, token counting, clear statuses for bad requests, and a prefix
//! cache that each cache salt has to itself.

use std::time::Duration;

use mantle_engine::test_support;
use mantle_proto::grammar::Kind;
use mantle_proto::runner_client::RunnerClient;
use mantle_proto::{
    ChatMessage, CountTokensRequest, EmbedRequest, FinishReason, GenerateRequest, Grammar, HealthRequest, InfoRequest,
    LoadState, generate_response,
};
use mantle_runner::{RunnerConfig, RunningRunner};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

async fn start() -> (RunningRunner, RunnerClient<Channel>) {
    start_model(test_support::smollm2_path(), "huggingfacetb.smollm2-135m-instruct-v1:0").await
}

async fn start_model(model_path: std::path::PathBuf, model_id: &str) -> (RunningRunner, RunnerClient<Channel>) {
    let config = RunnerConfig {
        kv_cache_bytes: 64 << 20,
        swap_bytes: 64 << 20,
        max_running: 16,
        ..RunnerConfig::local(model_path.to_string_lossy(), model_id)
    };
    let runner = mantle_runner::start(config).await.expect("runner starts");
    let client = RunnerClient::connect(format!("http://{}", runner.grpc_addr)).await.expect("client connects");
    (runner, client)
}

fn ask(question: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: "test".into(),
        messages: vec![ChatMessage { role: "user".into(), content: question.into() }],
        max_tokens,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_streams_real_tokens_then_a_finish_with_usage() {
    let (_runner, mut client) = start().await;
    let mut stream =
        client.generate(ask("What is the capital of France? Answer in one sentence.", 32)).await.unwrap().into_inner();
    let mut text = String::new();
    let mut chunks = 0;
    let mut finished = None;
    let mut started = None;
    while let Some(msg) = stream.next().await {
        match msg.unwrap().event.unwrap() {
            generate_response::Event::Started(s) => {
                assert!(started.is_none() && chunks == 0, "Started comes first, once");
                started = Some(s);
            }
            generate_response::Event::Token(t) => {
                chunks += 1;
                assert_eq!(t.token_ids.len(), 1);
                text.push_str(&t.text);
            }
            generate_response::Event::Finished(f) => finished = Some(f),
            generate_response::Event::PromptLogprobs(_) => panic!("prompt scores that were not asked for"),
        }
    }
    let finished = finished.expect("a Finished message ends the stream");
    assert!(text.contains("Paris"), "{text:?}");
    assert!(chunks > 3, "tokens are streamed one by one");
    assert_eq!(finished.reason(), FinishReason::EndTurn);
    let usage = finished.usage.unwrap();
    assert_eq!(usage.output_tokens as usize, chunks);
    assert!(usage.input_tokens > 20);
    assert_eq!(started.map(|s| (s.input_tokens, s.max_tokens)), Some((usage.input_tokens, 32)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_come_with_each_tokens_own_bytes() {
    let (_runner, mut client) = start().await;
    let request = GenerateRequest { logprobs: true, ..ask("Name a colour.", 12) };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let (mut text, mut bytes, mut reported) = (String::new(), Vec::new(), 0);
    while let Some(msg) = stream.next().await {
        if let generate_response::Event::Token(t) = msg.unwrap().event.unwrap() {
            text.push_str(&t.text);
            for l in t.token_logprobs {
                assert!(l.logprob <= 0.0 && l.logprob.is_finite(), "{l:?}");
                bytes.extend(l.token);
                reported += 1;
            }
        }
    }
    assert!(reported > 0);
    // The tokens' bytes spell the text (a stop token adds none).
    assert_eq!(String::from_utf8(bytes).unwrap(), text);
    // Without the flag, nothing extra is sent.
    let mut stream = client.generate(ask("Name a colour.", 4)).await.unwrap().into_inner();
    while let Some(msg) = stream.next().await {
        if let generate_response::Event::Token(t) = msg.unwrap().event.unwrap() {
            assert!(t.token_logprobs.is_empty() && t.logprobs.is_empty());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_is_scored_token_by_token_before_the_reply() {
    let (_runner, mut client) = start().await;
    let request = GenerateRequest {
        prompt: "The capital of France is Paris.".into(),
        max_tokens: 1,
        prompt_logprobs: true,
        logprobs: true,
        top_logprobs: 2,
        ..Default::default()
    };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let (mut scored, mut started, mut reply) = (Vec::new(), 0, Vec::new());
    while let Some(msg) = stream.next().await {
        match msg.unwrap().event.unwrap() {
            generate_response::Event::Started(s) => started = s.input_tokens,
            generate_response::Event::PromptLogprobs(p) => {
                assert_eq!(p.first_position as usize, scored.len(), "pieces in order");
                scored.extend(p.tokens);
            }
            generate_response::Event::Token(t) => {
                assert_eq!(scored.len(), started as usize, "the whole prompt is scored before the reply");
                reply.extend(t.token_logprobs);
            }
            generate_response::Event::Finished(_) => {}
        }
    }
    let bytes: Vec<u8> = scored.iter().flat_map(|t| t.token.clone()).collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), "The capital of France is Paris.");
    assert_eq!((scored[0].logprob, scored[0].top.len()), (0.0, 0));
    let paris = scored.iter().find(|t| t.token == b" Paris").expect("a Paris token");
    assert_eq!(paris.top.len(), 2);
    assert!(paris.logprob > -3.0, "the model knows: {paris:?}");
    assert_eq!(reply.len(), 1);
    assert_eq!(reply[0].top.len(), 2);
    // The same prompt as token ids scores the same.
    let ids: Vec<u32> = scored.iter().map(|t| t.token_id).collect();
    let request =
        GenerateRequest { prompt_token_ids: ids.clone(), max_tokens: 1, prompt_logprobs: true, ..Default::default() };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut again = Vec::new();
    while let Some(msg) = stream.next().await {
        if let generate_response::Event::PromptLogprobs(p) = msg.unwrap().event.unwrap() {
            again.extend(p.tokens);
        }
    }
    assert_eq!(again.iter().map(|t| t.token_id).collect::<Vec<_>>(), ids);
    assert!(again.iter().zip(&scored).all(|(a, b)| (a.logprob - b.logprob).abs() < 1e-4));
    // Ids outside the vocabulary, or ids beside a prompt, are refused.
    for (bad, says) in [
        (GenerateRequest { prompt_token_ids: vec![1, 10_000_000], max_tokens: 1, ..Default::default() }, "vocabulary"),
        (
            GenerateRequest { prompt_token_ids: vec![1], prompt: "x".into(), max_tokens: 1, ..Default::default() },
            "one of them",
        ),
        (GenerateRequest { top_logprobs: 21, ..ask("hi", 1) }, "top_logprobs"),
    ] {
        let status = client.generate(bad).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(says), "{}", status.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clamped_max_tokens_fit_the_context_instead_of_failing() {
    let (_runner, mut client) = start().await;
    let mut too_many = ask("Hi", 1_000_000);
    assert_eq!(client.generate(too_many.clone()).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    too_many.clamp_max_tokens = true;
    let mut stream = client.generate(too_many).await.unwrap().into_inner();
    let Some(generate_response::Event::Started(started)) = stream.next().await.unwrap().unwrap().event else {
        panic!("the stream opens with Started");
    };
    let context = client.info(InfoRequest {}).await.unwrap().into_inner().context_length;
    assert_eq!(started.input_tokens + started.max_tokens, context);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_its_kv_blocks() {
    let (runner, mut client) = start().await;
    let mut health = client.health(HealthRequest {}).await.unwrap().into_inner();
    let idle = health.next().await.unwrap().unwrap();
    assert_eq!(idle.free_kv_blocks, idle.total_kv_blocks);

    let mut stream = client.generate(ask("Write a long story about a dragon.", 1000)).await.unwrap().into_inner();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    // Signals sent before the generation started may still be in flight; wait for a current one.
    let busy = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let s = health.next().await.unwrap().unwrap();
            if s.running_sequences == 1 {
                return s;
            }
        }
    })
    .await
    .expect("the health stream reports the running generation");
    assert!(busy.free_kv_blocks < busy.total_kv_blocks, "the generation holds blocks");
    drop(stream);

    // 1,000 tokens would take seconds to generate; a cancelled one stops within a decode step.
    let freed = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let s = health.next().await.unwrap().unwrap();
            if s.running_sequences == 0 && s.free_kv_blocks == s.total_kv_blocks {
                return s;
            }
        }
    })
    .await
    .expect("blocks are freed soon after the client goes away");
    assert_eq!(freed.state(), LoadState::Healthy);
    let metrics = http_get(&format!("http://{}/metrics", runner.http_addr)).await;
    assert!(metrics.contains("mantle_runner_requests_total{outcome=\"cancelled\"} 1"), "{metrics}");
}

/// Runs a request to its end: the usage its Finished message reports.
async fn usage_of(client: &mut RunnerClient<Channel>, request: GenerateRequest) -> mantle_proto::Usage {
    let mut stream = client.generate(request).await.unwrap().into_inner();
    while let Some(msg) = stream.next().await {
        if let generate_response::Event::Finished(f) = msg.unwrap().event.unwrap() {
            return f.usage.expect("Finished carries usage");
        }
    }
    panic!("the stream ended without Finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_prompt_is_reused_only_under_the_same_cache_salt() {
    let (_runner, mut client) = start().await;
    let confidential = "You are the assistant of ACME Corp. Internal pricing, do not disclose: ".to_string()
        + &"widget 41 dollars, gadget 17 dollars, gizmo 99 dollars. ".repeat(12);
    let request = |salt: &str| GenerateRequest {
        messages: vec![
            ChatMessage { role: "system".into(), content: confidential.clone() },
            ChatMessage { role: "user".into(), content: "Hi".into() },
        ],
        cache_salt: salt.into(),
        ..ask("", 2)
    };
    let first = usage_of(&mut client, request("tenant-a")).await;
    assert_eq!(first.cached_prompt_tokens, 0);
    assert!(first.input_tokens > 200, "{} prompt tokens", first.input_tokens);
    let other = usage_of(&mut client, request("tenant-b")).await;
    assert_eq!(other.cached_prompt_tokens, 0, "another salt must not read tenant-a's cached prompt");
    let unsalted = usage_of(&mut client, request("")).await;
    assert_eq!(unsalted.cached_prompt_tokens, 0, "nor may a request without a salt");
    let same = usage_of(&mut client, request("tenant-a")).await;
    assert!(same.cached_prompt_tokens > 200, "the same salt reuses it: {} cached", same.cached_prompt_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_pushes_a_signal_every_100ms() {
    let (_runner, mut client) = start().await;
    let mut health = client.health(HealthRequest {}).await.unwrap().into_inner();
    let started = tokio::time::Instant::now();
    for _ in 0..5 {
        let s = health.next().await.unwrap().unwrap();
        assert_eq!(s.state(), LoadState::Healthy);
        assert_eq!(s.queue_depth, 0);
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_count_tokens_and_embed_describe_the_model() {
    let (runner, mut client) = start().await;
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model_id, "huggingfacetb.smollm2-135m-instruct-v1:0");
    assert_eq!(info.modality, "TEXT");
    assert_eq!(info.vocab_size, 49152);
    assert!(info.context_length >= 1024);
    assert_eq!(info.weight_load[0].tier, "host_memory");

    let raw =
        client.count_tokens(CountTokensRequest { prompt: "Hello world".into(), ..Default::default() }).await.unwrap();
    assert_eq!(raw.into_inner().input_tokens, 2);
    let chat = CountTokensRequest { messages: ask("Hello world", 1).messages, ..Default::default() };
    assert!(client.count_tokens(chat).await.unwrap().into_inner().input_tokens > 10, "the chat template adds tokens");

    let err = client.embed(EmbedRequest { texts: vec!["x".into()], ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let http = format!("http://{}", runner.http_addr);
    let ready = http_get(&format!("{http}/readyz")).await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = http_get(&format!("{http}/metrics")).await;
    assert!(metrics.contains("mantle_runner_kv_blocks_total"), "{metrics}");
    assert!(metrics.contains("mantle_runner_weight_load_seconds{tier=\"host_memory\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_invalid_argument_with_a_reason() {
    let (_runner, mut client) = start().await;
    let mut cases = vec![
        (GenerateRequest { max_tokens: 5, ..Default::default() }, "neither messages nor a prompt"),
        (GenerateRequest { max_tokens: 0, ..ask("hi", 0) }, "max tokens 0"),
        (GenerateRequest { max_tokens: 1_000_000, ..ask("hi", 0) }, "max tokens 1000000"),
        (GenerateRequest { temperature: -1.0, ..ask("hi", 5) }, "temperature"),
        (GenerateRequest { top_p: 1.5, ..ask("hi", 5) }, "top_p"),
    ];
    let mut bad_role = ask("hi", 5);
    bad_role.messages[0].role = "robot".into();
    cases.push((bad_role, "messages[0].role"));
    let long = GenerateRequest { prompt: "word ".repeat(5000), max_tokens: 5, ..Default::default() };
    cases.push((long, "the model's context is"));
    for (kind, expected) in [
        (Kind::JsonSchema("{not json".into()), "grammar.json_schema is not JSON"),
        (Kind::JsonSchema(r#"{"type": "nonsense"}"#.into()), "grammar:"),
        (Kind::Regex("(unclosed".into()), "grammar:"),
        (Kind::Lark("start: missing".into()), "grammar:"),
    ] {
        cases.push((GenerateRequest { grammar: Some(Grammar { kind: Some(kind) }), ..ask("hi", 5) }, expected));
    }
    for (request, expected) in cases {
        let Err(err) = client.generate(request).await else { panic!("{expected}: accepted") };
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(expected), "{:?} should mention {expected:?}", err.message());
    }
    let past = GenerateRequest { deadline_unix_ms: 1, ..ask("hi", 5) };
    assert_eq!(client.generate(past).await.err().unwrap().code(), Code::DeadlineExceeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grammar_constrains_the_streamed_reply_and_ends_it_when_complete() {
    let (_runner, mut client) = start().await;
    let schema = r#"{"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999}}, "required": ["city", "population"], "additionalProperties": false}"#;
    let request = GenerateRequest {
        grammar: Some(Grammar { kind: Some(Kind::JsonSchema(schema.into())) }),
        ..ask("Tell me about Paris.", 64)
    };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let (mut text, mut finished) = (String::new(), None);
    while let Some(msg) = stream.next().await {
        match msg.unwrap().event.unwrap() {
            generate_response::Event::Token(t) => text.push_str(&t.text),
            generate_response::Event::Finished(f) => finished = Some(f),
            generate_response::Event::Started(_) | generate_response::Event::PromptLogprobs(_) => {}
        }
    }
    let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(value["city"].is_string() && value["population"].is_i64(), "{text}");
    assert_eq!(value.as_object().unwrap().len(), 2, "{text}");
    assert_eq!(finished.expect("finished").reason(), FinishReason::EndTurn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_runner_serves_normalised_vectors() {
    let (_runner, mut client) =
        start_model(test_support::minilm_dir(), "sentence-transformers.all-minilm-l6-v2-v1:0").await;
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.modality.as_str(), info.embedding_dimensions), ("EMBEDDING", 384));
    let texts = vec![
        "How do I reset my password?".to_string(),
        "I forgot my password.".to_string(),
        "Bananas are yellow.".to_string(),
    ];
    let out = client.embed(EmbedRequest { request_id: "e".into(), texts }).await.unwrap().into_inner();
    assert_eq!(out.embeddings.len(), 3);
    let v: Vec<&[f32]> = out.embeddings.iter().map(|e| e.values.as_slice()).collect();
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!((cos(v[0], v[0]) - 1.0).abs() < 1e-4);
    assert!(cos(v[0], v[1]) > cos(v[0], v[2]) + 0.3);
    assert!(out.input_tokens > 10);

    let err = client.embed(EmbedRequest { request_id: "e".into(), texts: vec![] }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let Err(err) = client.generate(ask("hi", 5)).await else { panic!("an embedding model cannot generate") };
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
}

/// A minimal HTTP/1.1 GET over a TCP socket, to keep test dependencies small.
async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut socket = tokio::net::TcpStream::connect(host).await.unwrap();
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    response
}

/// ChatMessage and CountTokensRequest with `bytes` where the API has `string`: the same wire
/// format, so a client can send text that is not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawChatMessage {
    #[prost(bytes = "vec", tag = "1")]
    role: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    content: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawCountTokens {
    #[prost(message, repeated, tag = "1")]
    messages: Vec<RawChatMessage>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_an_invalid_argument() {
    let (runner, _) = start().await;
    let channel = Channel::from_shared(format!("http://{}", runner.grpc_addr)).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request =
        RawCountTokens { messages: vec![RawChatMessage { role: b"user".to_vec(), content: vec![0xff, 0xfe, b'h'] }] };
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/mantle.runner.v1.Runner/CountTokens");
    let codec = tonic_prost::ProstCodec::<RawCountTokens, mantle_proto::CountTokensResponse>::default();
    let status = grpc.unary(tonic::Request::new(request), path, codec).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("not valid protobuf"), "{}", status.message());
}

/// Tokenizing a huge prompt takes its time on the blocking pool: on a runtime with one worker
/// thread, the Health stream (what the router routes by) keeps its 100 ms beat meanwhile.
#[tokio::test(flavor = "current_thread")]
async fn health_keeps_its_beat_while_a_huge_prompt_is_tokenized() {
    let (_runner, mut client) = start().await;
    let mut health = client.health(HealthRequest {}).await.unwrap().into_inner();
    health.next().await.unwrap().unwrap();
    let mut counter = client.clone();
    let huge = "the quick brown fox jumps over the lazy dog, again and again. ".repeat(50_000);
    let count = tokio::spawn(async move {
        counter.count_tokens(CountTokensRequest { messages: vec![], prompt: huge }).await.map(|r| r.into_inner())
    });
    let mut longest = Duration::ZERO;
    let mut last = std::time::Instant::now();
    while !count.is_finished() {
        health.next().await.unwrap().unwrap();
        longest = longest.max(last.elapsed());
        last = std::time::Instant::now();
    }
    let counted = count.await.unwrap().unwrap();
    assert!(counted.input_tokens > 300_000, "{}", counted.input_tokens);
    assert!(longest < Duration::from_millis(400), "health went silent for {longest:?} while tokenizing");
}
