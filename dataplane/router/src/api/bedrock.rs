//! bedrock-runtime: Converse, ConverseStream, InvokeModel, InvokeModelWithResponseStream,
//! CountTokens.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use mantle_admission::Priority;
use mantle_crds::Modality;
use serde_json::{Value, json};
use tracing::Instrument;

use super::stream::{self, Frames};
use super::{Caller, Shared, require_json};
use crate::adapters::converse::{self, ConverseBody, ConverseTokensBody};
use crate::adapters::native::{self, EmbedDialect, StreamChunks, TextDialect};
use crate::adapters::{StopReason, TextOutput, TextRequest, parse_body, union};
use crate::catalog::ModelEntry;
use crate::error::{ApiError, ApiResult, StreamUnion};
use crate::guard;
use crate::inference::{Ctx, Generation, Inference, Piece};

fn fail(state: &Shared, api: &str, model_id: &str, error: ApiError) -> Response {
    super::fail(state, api, model_id, error, ApiError::into_bedrock)
}

fn model_used(response: &mut Response, model_id: &str) {
    if let Ok(v) = HeaderValue::from_str(model_id) {
        response.headers_mut().insert("x-mantle-model-used", v);
    }
}

/// The request context and model for a Bedrock operation.
fn begin(
    state: &Shared,
    caller: &Caller,
    api: &'static str,
    model_id: &str,
    headers: &HeaderMap,
) -> ApiResult<(Ctx, ModelEntry)> {
    let ctx = caller.ctx(api, headers)?;
    if let Some(id) = headers.get("x-amzn-bedrock-guardrailidentifier") {
        let version = headers.get("x-amzn-bedrock-guardrailversion").and_then(|v| v.to_str().ok());
        return Err(guard::refuse_guardrail(id.to_str().unwrap_or_default(), version));
    }
    let model = state.inference.resolve(&caller.tenant.name, model_id)?;
    Ok((ctx, model))
}

/// A FoundationModel whose declared body family does not fit its modality (the CRD's rules
/// refuse one; a model built some other way could still carry it).
fn wrong_body(model: &ModelEntry) -> ApiError {
    ApiError::Internal(format!(
        "{} is declared with invokeModelBody {:?}, which is not a body of its modality.",
        model.model_id, model.invoke_body
    ))
}

/// The native text body the model takes.
fn text_dialect(model: &ModelEntry) -> ApiResult<TextDialect> {
    TextDialect::of(model.invoke_body).ok_or_else(|| wrong_body(model))
}

/// Applies the output guards to a whole reply.
fn guard_output(inference: &Inference, ctx: &Ctx, output: &mut TextOutput) {
    inference.guards().guard_reply(ctx, output);
}

pub async fn converse(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api = "Converse";
    let result = async {
        let (ctx, model, req, span) = converse_request(&state, &caller, api, &model_id, &headers, &body)?;
        let mut done = state.inference.complete(&ctx, &model, &req).instrument(span).await?;
        guard_output(&state.inference, &ctx, &mut done.output);
        let latency = ctx.received.elapsed().as_millis() as u64;
        let mut response = axum::Json(converse::response(&done.output, latency)).into_response();
        model_used(&mut response, &done.model_used);
        Ok::<_, ApiError>(response)
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, api, &model_id, e))
}

/// The context, model, runner request and span of a Converse or ConverseStream call. Converse's
/// `serviceTier` `flex` lowers the request to LOW priority.
fn converse_request(
    state: &Shared,
    caller: &Caller,
    api: &'static str,
    model_id: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<(Ctx, ModelEntry, TextRequest, tracing::Span)> {
    require_json(headers, "content-type")?;
    let (mut ctx, model) = begin(state, caller, api, model_id, headers)?;
    let body: ConverseBody = parse_body(body)?;
    if let Some(guardrail) = &body.guardrail_config {
        if api == "Converse" && guardrail.stream_processing_mode.is_some() {
            return Err(ApiError::validation(
                "Malformed request body at guardrailConfig: unknown field `streamProcessingMode` \
                 (only ConverseStream takes it)",
            ));
        }
        let id = guardrail.guardrail_identifier.as_deref().unwrap_or_default();
        return Err(guard::refuse_guardrail(id, guardrail.guardrail_version.as_deref()));
    }
    if body.service_tier.as_ref().is_some_and(|t| t.kind == "flex") {
        ctx.priority = ctx.priority.max(Priority::Low);
    }
    let req = converse::to_request(&body)?;
    let span = Inference::span(&ctx, &model.model_id);
    Ok((ctx, model, req, span))
}

pub async fn converse_stream(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api = "ConverseStream";
    let result = async {
        let (ctx, model, req, span) = converse_request(&state, &caller, api, &model_id, &headers, &body)?;
        // Tool calls and structured output are known only once the reply is whole: generate it,
        // then stream it.
        if !req.tools.is_empty() || req.json_schema.is_some() {
            let mut done = state.inference.complete(&ctx, &model, &req).instrument(span.clone()).await?;
            guard_output(&state.inference, &ctx, &mut done.output);
            let (frames, mut response) = stream::event_stream(StreamUnion::ConverseStreamOutput, &[]);
            model_used(&mut response, &done.model_used);
            tokio::spawn(
                async move {
                    let latency = ctx.received.elapsed().as_millis() as u64;
                    let output = done.output;
                    if !frames.event("messageStart", &converse::message_start()).await {
                        return;
                    }
                    let text = output.tool_call.is_none() && !output.text.is_empty();
                    if text && !frames.event("contentBlockDelta", &converse::text_delta(&output.text)).await {
                        return;
                    }
                    for (name, payload) in converse::closing_events(&output, text, latency) {
                        if !frames.event(name, &payload).await {
                            return;
                        }
                    }
                }
                .instrument(span),
            );
            return Ok(response);
        }
        let generation = state.inference.generate(&ctx, &model, &req).instrument(span.clone()).await?;
        let (frames, mut response) = stream::event_stream(StreamUnion::ConverseStreamOutput, &[]);
        model_used(&mut response, &generation.model.model_id);
        tokio::spawn(pump_converse(state.clone(), ctx, generation, frames).instrument(span));
        Ok::<_, ApiError>(response)
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, api, &model_id, e))
}

/// Streams a generation as ConverseStream events. Returns early (dropping the generation, which
/// cancels it on the runner) as soon as the client is gone.
async fn pump_converse(state: Shared, ctx: Ctx, mut generation: Generation, frames: Frames) {
    if !frames.event("messageStart", &converse::message_start()).await {
        return;
    }
    let mut open = false;
    let mut so_far = String::new();
    let guards = state.inference.guards();
    loop {
        match generation.next().await {
            Ok(Some(Piece::Text { text, .. })) => {
                let guarded = guards.guard(&ctx, &so_far, text);
                let text = match guarded.blocked {
                    false => guarded.text,
                    true => {
                        let message = guarded.text;
                        let output = TextOutput {
                            text: message.clone(),
                            tool_call: None,
                            stop_reason: StopReason::GuardrailIntervened,
                            stop_sequence: None,
                            usage: Default::default(),
                        };
                        let _ = frames.event("contentBlockDelta", &converse::text_delta(&message)).await;
                        let latency = ctx.received.elapsed().as_millis() as u64;
                        for (name, payload) in converse::closing_events(&output, true, latency) {
                            let _ = frames.event(name, &payload).await;
                        }
                        return;
                    }
                };
                if text.is_empty() {
                    continue;
                }
                so_far.push_str(&text);
                open = true;
                if !frames.event("contentBlockDelta", &converse::text_delta(&text)).await {
                    return;
                }
            }
            Ok(Some(Piece::Done(output))) => {
                let latency = ctx.received.elapsed().as_millis() as u64;
                for (name, payload) in converse::closing_events(&output, open, latency) {
                    if !frames.event(name, &payload).await {
                        return;
                    }
                }
                return;
            }
            Ok(None) => return,
            Err(error) => {
                generation.count_stream_error(&error);
                let _ = frames.exception(&error).await;
                return;
            }
        }
    }
}

fn token_headers(response: &mut Response, output: &TextOutput, latency_ms: u64) {
    let headers = response.headers_mut();
    headers.insert("x-amzn-bedrock-input-token-count", HeaderValue::from(output.usage.input_tokens));
    headers.insert("x-amzn-bedrock-output-token-count", HeaderValue::from(output.usage.output_tokens));
    headers.insert("x-amzn-bedrock-invocation-latency", HeaderValue::from(latency_ms));
}

pub async fn invoke(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api = "InvokeModel";
    let result = async {
        require_json(&headers, "content-type")?;
        require_json(&headers, "accept")?;
        let (ctx, model) = begin(&state, &caller, api, &model_id, &headers)?;
        let value = native::json_body(&body)?;
        let span = Inference::span(&ctx, &model.model_id);
        match model.modality {
            Modality::Text => {
                let dialect = text_dialect(&model)?;
                let req = native::text_request(dialect, &value)?;
                let mut done = state.inference.complete(&ctx, &model, &req).instrument(span).await?;
                guard_output(&state.inference, &ctx, &mut done.output);
                let body = native::response(dialect, &ctx.request_id, &done.model_used, &done.output);
                let mut response = axum::Json(body).into_response();
                token_headers(&mut response, &done.output, ctx.received.elapsed().as_millis() as u64);
                model_used(&mut response, &done.model_used);
                Ok(response)
            }
            Modality::Embedding => {
                let dialect = EmbedDialect::of(model.invoke_body).ok_or_else(|| wrong_body(&model))?;
                let req = native::embed_request(dialect, &value)?;
                let (mut vectors, tokens) =
                    state.inference.embed(&ctx, &model, req.texts.clone(), req.dimensions).instrument(span).await?;
                if dialect == EmbedDialect::Titan {
                    native::normalize(&mut vectors);
                }
                let body = native::embed_response(&req, &ctx.request_id, &vectors, tokens);
                let mut response = axum::Json(body).into_response();
                response.headers_mut().insert("x-amzn-bedrock-input-token-count", HeaderValue::from(tokens));
                Ok::<_, ApiError>(response)
            }
        }
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, api, &model_id, e))
}

pub async fn invoke_stream(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api = "InvokeModelWithResponseStream";
    let result = async {
        require_json(&headers, "content-type")?;
        require_json(&headers, "x-amzn-bedrock-accept")?;
        let (ctx, model) = begin(&state, &caller, api, &model_id, &headers)?;
        if model.modality != Modality::Text {
            return Err(ApiError::validation(format!("{} does not support response streaming.", model.model_id)));
        }
        let dialect = text_dialect(&model)?;
        let req = native::text_request(dialect, &native::json_body(&body)?)?;
        let span = Inference::span(&ctx, &model.model_id);
        let extra = [("x-amzn-bedrock-content-type", "application/json")];
        if !req.tools.is_empty() {
            let mut done = state.inference.complete(&ctx, &model, &req).instrument(span.clone()).await?;
            guard_output(&state.inference, &ctx, &mut done.output);
            let (frames, mut response) = stream::event_stream(StreamUnion::ResponseStream, &extra);
            model_used(&mut response, &done.model_used);
            tokio::spawn(
                async move {
                    let output = done.output;
                    let mut chunks = StreamChunks::new(dialect);
                    let mut all = chunks.start(&ctx.request_id, &done.model_used, output.usage.input_tokens);
                    match &output.tool_call {
                        Some(call) => all.extend(chunks.tool_use(call)),
                        None => {
                            all.push(chunks.delta(&output.text, output.usage.output_tokens, output.usage.input_tokens))
                        }
                    }
                    let latency = ctx.received.elapsed().as_millis() as u64;
                    all.extend(chunks.finish(&output, native::invocation_metrics(&output, latency, latency)));
                    for chunk in all {
                        if !send_chunk(&frames, &chunk).await {
                            return;
                        }
                    }
                }
                .instrument(span),
            );
            return Ok(response);
        }
        let generation = state.inference.generate(&ctx, &model, &req).instrument(span.clone()).await?;
        let (frames, mut response) = stream::event_stream(StreamUnion::ResponseStream, &extra);
        model_used(&mut response, &generation.model.model_id);
        tokio::spawn(pump_native(state.clone(), ctx, dialect, generation, frames).instrument(span));
        Ok::<_, ApiError>(response)
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, api, &model_id, e))
}

/// One IMWRS `chunk` event: the model chunk's JSON, base64 encoded.
async fn send_chunk(frames: &Frames, chunk: &Value) -> bool {
    let bytes = base64::engine::general_purpose::STANDARD.encode(chunk.to_string());
    frames.event("chunk", &json!({ "bytes": bytes })).await
}

async fn pump_native(state: Shared, ctx: Ctx, dialect: TextDialect, mut generation: Generation, frames: Frames) {
    let mut chunks = StreamChunks::new(dialect);
    let input_tokens = generation.input_tokens;
    for chunk in chunks.start(&ctx.request_id, &generation.model.model_id, input_tokens) {
        if !send_chunk(&frames, &chunk).await {
            return;
        }
    }
    let mut so_far = String::new();
    let guards = state.inference.guards();
    loop {
        match generation.next().await {
            Ok(Some(Piece::Text { text, tokens, .. })) => {
                let guarded = guards.guard(&ctx, &so_far, text);
                so_far.push_str(&guarded.text);
                if !send_chunk(&frames, &chunks.delta(&guarded.text, tokens, input_tokens)).await {
                    return;
                }
                if guarded.blocked {
                    // The reply stops here, and says why, as every other API does.
                    drop(generation);
                    let output = TextOutput {
                        text: so_far,
                        tool_call: None,
                        stop_reason: StopReason::GuardrailIntervened,
                        stop_sequence: None,
                        usage: Default::default(),
                    };
                    let latency = ctx.received.elapsed().as_millis() as u64;
                    let metrics = native::invocation_metrics(&output, latency, 0);
                    for chunk in chunks.finish(&output, metrics) {
                        if !send_chunk(&frames, &chunk).await {
                            return;
                        }
                    }
                    return;
                }
            }
            Ok(Some(Piece::Done(output))) => {
                let latency = ctx.received.elapsed().as_millis() as u64;
                let metrics = native::invocation_metrics(&output, latency, generation.first_byte_ms());
                for chunk in chunks.finish(&output, metrics) {
                    if !send_chunk(&frames, &chunk).await {
                        return;
                    }
                }
                return;
            }
            Ok(None) => return,
            Err(error) => {
                generation.count_stream_error(&error);
                let _ = frames.exception(&error).await;
                return;
            }
        }
    }
}

pub async fn count_tokens(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api = "CountTokens";
    let result = async {
        require_json(&headers, "content-type")?;
        let (ctx, model) = begin(&state, &caller, api, &model_id, &headers)?;
        if model.modality != Modality::Text {
            return Err(ApiError::validation(format!("{} does not count tokens for text generation.", model.model_id)));
        }
        let body: CountTokensBody = parse_body(&body)?;
        let req = count_tokens_request(&model, body.input)?;
        let tokens =
            state.inference.count_tokens(&ctx, &model, &req).instrument(Inference::span(&ctx, &model.model_id)).await?;
        Ok::<_, ApiError>(axum::Json(json!({ "inputTokens": tokens })).into_response())
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, api, &model_id, e))
}

/// The CountTokens request body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CountTokensBody {
    input: CountTokensInput,
}

union! {
    /// What to count: an InvokeModel body or a Converse request.
    enum CountTokensInput {
        "invokeModel" => InvokeModel(InvokeModelTokens),
        "converse" => Converse(ConverseTokensBody),
    }
}

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct InvokeModelTokens {
    /// The body, base64-encoded.
    body: String,
}

fn count_tokens_request(model: &ModelEntry, input: CountTokensInput) -> ApiResult<TextRequest> {
    match input {
        CountTokensInput::InvokeModel(invoke) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&invoke.body)
                .map_err(|e| ApiError::validation(format!("input.invokeModel.body is not base64: {e}")))?;
            native::text_request(text_dialect(model)?, &native::json_body(&bytes)?)
        }
        CountTokensInput::Converse(body) => converse::to_request(&body.into()),
    }
}
