//! The OpenAI-compatible API: chat completions (whole or streamed as server-sent events),
//! embeddings and the model list.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use mantle_crds::Modality;
use serde_json::{Value, json};
use tracing::Instrument;

use super::stream::{self, Frames};
use super::{Caller, Shared, check_cache_salt, require_json};
use crate::adapters::openai::{self, ChatCompletion};
use crate::adapters::{StopReason, TextOutput};
use crate::error::ApiError;
use crate::guard::Guarded;
use crate::inference::{Ctx, Generation, Inference, Piece};

pub(super) fn fail(state: &Shared, api: &str, model: &str, error: ApiError) -> Response {
    super::fail(state, api, model, error, ApiError::into_openai)
}

pub(super) fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::validation(format!("the body is not valid JSON: {e}")))
}

/// Takes the body's `cache_salt` (as vLLM does) into the request's context; it must agree with
/// the `x-mantle-cache-salt` header when both are sent.
pub(super) fn take_cache_salt(ctx: &mut Ctx, salt: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(salt) = salt else { return Ok(()) };
    check_cache_salt(salt, "cache_salt")?;
    if headers.contains_key("x-mantle-cache-salt") && salt != ctx.cache_salt {
        return Err(ApiError::validation("cache_salt and the x-mantle-cache-salt header disagree; send one"));
    }
    ctx.cache_salt = salt.to_string();
    Ok(())
}

pub async fn chat_completions(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api = "ChatCompletions";
    let mut requested = String::new();
    let result = async {
        require_json(&headers, "content-type")?;
        let completion = openai::chat_request(&json_body(&body)?)?;
        requested = completion.model.clone();
        let mut ctx = caller.ctx(api, &headers)?;
        take_cache_salt(&mut ctx, completion.cache_salt.as_deref(), &headers)?;
        let model = state.inference.resolve(&caller.tenant.name, &completion.model)?;
        let span = Inference::span(&ctx, &model.model_id);
        let ChatCompletion { model: name, stream, include_usage, request, .. } = completion;
        let needs_whole_reply = !request.tools.is_empty() || request.json_schema.is_some();
        let logprobs = request.logprobs;
        if !stream || needs_whole_reply {
            let mut done = state.inference.complete(&ctx, &model, &request).instrument(span.clone()).await?;
            let unguarded = done.output.text.clone();
            state.inference.guards().guard_reply(&ctx, &mut done.output);
            if done.output.text != unguarded {
                // The runner's tokens would show what a guard masked or blocked.
                done.logprobs.clear();
            }
            if !stream {
                let mut body = openai::chat_response(&ctx.request_id, &name, &done.output);
                if logprobs {
                    body = openai::with_logprobs(body, &done.logprobs);
                }
                let mut response = axum::Json(body).into_response();
                if let Ok(v) = HeaderValue::from_str(&done.model_used) {
                    response.headers_mut().insert("x-mantle-model-used", v);
                }
                return Ok(response);
            }
            let (frames, response) = stream::sse();
            tokio::spawn(
                async move {
                    let id = ctx.request_id.clone();
                    let output = done.output;
                    let delta = match &output.tool_call {
                        Some(call) => {
                            json!({"role": "assistant", "tool_calls": [{"index": 0, "id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": call.input.to_string()}}]})
                        }
                        None => json!({"role": "assistant", "content": output.text}),
                    };
                    let mut chunk = openai::chunk(&id, &name, delta, None);
                    if logprobs {
                        chunk = openai::with_logprobs(chunk, &done.logprobs);
                    }
                    let _ = frames.sse(&chunk.to_string()).await
                        && finish_sse(&frames, &id, &name, &output, include_usage).await;
                }
                .instrument(span),
            );
            return Ok(response);
        }
        let generation = state.inference.generate(&ctx, &model, &request).instrument(span.clone()).await?;
        let (frames, response) = stream::sse();
        let options = SseOptions { include_usage, logprobs };
        tokio::spawn(pump_sse(state.clone(), ctx, name, options, generation, frames).instrument(span));
        Ok::<_, ApiError>(response)
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, api, &requested, e))
}

async fn finish_sse(frames: &Frames, id: &str, model: &str, output: &TextOutput, include_usage: bool) -> bool {
    frames.sse(&openai::chunk(id, model, json!({}), Some(output.stop_reason)).to_string()).await
        && (!include_usage || frames.sse(&openai::usage_chunk(id, model, output).to_string()).await)
        && frames.sse("[DONE]").await
}

/// What a streamed chat completion adds to its chunks.
struct SseOptions {
    include_usage: bool,
    logprobs: bool,
}

async fn pump_sse(
    state: Shared,
    ctx: Ctx,
    model: String,
    options: SseOptions,
    mut generation: Generation,
    frames: Frames,
) {
    let SseOptions { include_usage, logprobs: with_logprobs } = options;
    let id = ctx.request_id.clone();
    if !frames.sse(&openai::chunk(&id, &model, json!({"role": "assistant", "content": ""}), None).to_string()).await {
        return;
    }
    let mut so_far = String::new();
    let guards = state.inference.guards();
    loop {
        match generation.next().await {
            Ok(Some(Piece::Text { text, mut logprobs, .. })) => {
                let unguarded = text.clone();
                let Guarded { text, blocked } = guards.guard(&ctx, &so_far, text);
                if blocked || text != unguarded {
                    // The runner's tokens would show what a guard masked or blocked.
                    logprobs.clear();
                }
                so_far.push_str(&text);
                let mut chunk = openai::chunk(&id, &model, json!({"content": text}), None);
                if with_logprobs {
                    chunk = openai::with_logprobs(chunk, &logprobs);
                }
                if !frames.sse(&chunk.to_string()).await {
                    return;
                }
                if blocked {
                    let _ = frames
                        .sse(&openai::chunk(&id, &model, json!({}), Some(StopReason::GuardrailIntervened)).to_string())
                        .await
                        && frames.sse("[DONE]").await;
                    return;
                }
            }
            Ok(Some(Piece::Done(output))) => {
                finish_sse(&frames, &id, &model, &output, include_usage).await;
                return;
            }
            Ok(None) => return,
            Err(error) => {
                generation.count_stream_error(&error);
                let body =
                    json!({"error": {"message": error.to_string(), "type": "server_error", "code": error.kind()}});
                let _ = frames.sse(&body.to_string()).await;
                return;
            }
        }
    }
}

pub async fn embeddings(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api = "Embeddings";
    let mut requested = String::new();
    let result = async {
        require_json(&headers, "content-type")?;
        let req = openai::embeddings_request(&json_body(&body)?)?;
        requested = req.model.clone();
        let ctx = caller.ctx(api, &headers)?;
        let model = state.inference.resolve(&caller.tenant.name, &req.model)?;
        let span = Inference::span(&ctx, &model.model_id);
        let (vectors, tokens) = state.inference.embed(&ctx, &model, req.texts, req.dimensions).instrument(span).await?;
        Ok::<_, ApiError>(
            axum::Json(openai::embeddings_response(&req.model, &vectors, req.base64, tokens)).into_response(),
        )
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, api, &requested, e))
}

fn model_object(id: &str, provider: &str) -> Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": provider })
}

pub async fn list_models(State(state): State<Shared>) -> Response {
    let data: Vec<Value> =
        state.inference.live().catalog.iter().map(|m| model_object(&m.model_id, &m.provider)).collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

pub async fn get_model(State(state): State<Shared>, Path(model_id): Path<String>) -> Response {
    match state.inference.live().catalog.resolve(&model_id) {
        Ok(m) => {
            let mut body = model_object(&m.model_id, &m.provider);
            body["mantle_modality"] = json!(if m.modality == Modality::Text { "TEXT" } else { "EMBEDDING" });
            axum::Json(body).into_response()
        }
        Err(e) => e.into_openai(),
    }
}
