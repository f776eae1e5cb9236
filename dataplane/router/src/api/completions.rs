//! OpenAI's `/v1/completions`: prompts continued without a chat template, whole (one generation
//! per prompt, run side by side) or streamed as server-sent events; with `echo` and `logprobs`,
//! the prompt scored token by token.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::openai::{fail, json_body, take_cache_salt};
use super::stream::{self, Frames};
use super::{Caller, Shared, require_json};
use crate::adapters::completions::{self, Answer, Completion, Prompt};
use crate::adapters::{StopReason, TextOutput, TokenLogprob};
use crate::catalog::ModelEntry;
use crate::error::ApiError;
use crate::guard::Guarded;
use crate::inference::{Completed, Ctx, Generation, Inference, Piece, Settled};

pub async fn completions(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api = "Completions";
    let mut requested = String::new();
    let result = async {
        require_json(&headers, "content-type")?;
        let completion = completions::completion_request(&json_body(&body)?)?;
        requested = completion.model.clone();
        let mut ctx = caller.ctx(api, &headers)?;
        take_cache_salt(&mut ctx, completion.cache_salt.as_deref(), &headers)?;
        let model = state.inference.resolve(&caller.tenant.name, &completion.model)?;
        if completion.score_only {
            ctx.settled.drop_output();
        }
        if !state.inference.guards().input.is_empty()
            && completion.prompts.iter().any(|p| matches!(p, Prompt::Tokens(_)))
        {
            return Err(ApiError::validation(
                "prompts of token ids cannot be checked by this router's input guardrails; send the prompt as text",
            ));
        }
        let span = Inference::span(&ctx, &model.model_id);
        if completion.stream {
            let request = completion.request_for(&completion.prompts[0]);
            let generation = state.inference.generate(&ctx, &model, &request).instrument(span.clone()).await?;
            let (frames, response) = stream::sse();
            tokio::spawn(pump(state.clone(), ctx, completion, generation, frames).instrument(span));
            return Ok(response);
        }
        let mut done = complete_all(&state, &ctx, &model, &completion).instrument(span).await?;
        let guards = state.inference.guards();
        for d in &mut done {
            let unguarded = d.output.text.clone();
            guards.guard_reply(&ctx, &mut d.output);
            if d.output.text != unguarded {
                // The runner's tokens would show what a guard masked or blocked.
                d.logprobs.clear();
            }
        }
        let answers: Vec<Answer<'_>> = completion
            .prompts
            .iter()
            .zip(&done)
            .map(|(prompt, d)| Answer {
                prompt,
                output: &d.output,
                logprobs: &d.logprobs,
                prompt_logprobs: &d.prompt_logprobs,
            })
            .collect();
        Ok::<_, ApiError>(axum::Json(completion.response(&ctx.request_id, &answers)).into_response())
    }
    .await;
    result.unwrap_or_else(|e| fail(&state, api, &requested, e))
}

/// Completes every prompt, side by side: each is a request of its own to admission, placement
/// and metering (`<request id>-<index>` when there are several). The first failure fails the
/// whole (the others are cancelled).
async fn complete_all(
    state: &Shared,
    ctx: &Ctx,
    model: &ModelEntry,
    completion: &Completion,
) -> Result<Vec<Completed>, ApiError> {
    if let [prompt] = completion.prompts.as_slice() {
        return Ok(vec![state.inference.complete(ctx, model, &completion.request_for(prompt)).await?]);
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut parts = Vec::new();
    for (i, prompt) in completion.prompts.iter().enumerate() {
        let mut ctx = ctx.clone();
        ctx.request_id = format!("{}-{i}", ctx.request_id);
        ctx.settled = Settled::default();
        if completion.score_only {
            ctx.settled.drop_output();
        }
        parts.push(ctx.settled.clone());
        let (inference, model, request) = (state.inference.clone(), model.clone(), completion.request_for(prompt));
        tasks.spawn(async move { (i, inference.complete(&ctx, &model, &request).await) }.in_current_span());
    }
    let mut done: Vec<Option<Completed>> = (0..completion.prompts.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.map_err(|e| ApiError::Internal(format!("a prompt's task failed: {e}")));
        match outcome.and_then(|(i, result)| result.map(|d| (i, d))) {
            Ok((i, d)) => done[i] = Some(d),
            Err(e) => {
                // The request fails as a whole: the other prompts, cancelled as the tasks drop,
                // are recorded but not billed.
                parts.iter().for_each(Settled::waive);
                return Err(e);
            }
        }
    }
    Ok(done.into_iter().flatten().collect())
}

/// Streams one prompt's completion: the echoed prompt first (with its scores), then the text as
/// it comes, the finish, the usage when asked for, and `[DONE]`.
async fn pump(state: Shared, ctx: Ctx, completion: Completion, mut generation: Generation, frames: Frames) {
    let id = ctx.request_id.clone();
    let guards = state.inference.guards();
    let mut so_far = String::new();
    let mut echoed = !completion.echo;
    // Characters streamed so far (echo included): where the next chunk's text_offset starts.
    let mut sent = 0;
    let send = |chunk: serde_json::Value| {
        let frames = &frames;
        async move { frames.sse(&chunk.to_string()).await }
    };
    loop {
        let piece = generation.next().await;
        if !echoed && piece.is_ok() {
            // The prompt's scores have all arrived before the first piece.
            echoed = true;
            let scores = generation.take_prompt_logprobs();
            let text = completion.echoed(&completion.prompts[0], &scores);
            if !send(completion.chunk(&id, (&text, sent), &scores, false, None)).await {
                return;
            }
            sent += text.chars().count();
        }
        match piece {
            Ok(Some(Piece::Text { text, mut logprobs, .. })) => {
                if completion.score_only {
                    continue;
                }
                let unguarded = text.clone();
                let Guarded { text, blocked } = guards.guard(&ctx, &so_far, text);
                if blocked || text != unguarded {
                    logprobs.clear();
                }
                so_far.push_str(&text);
                if !send(completion.chunk(&id, (&text, sent), &logprobs, true, None)).await {
                    return;
                }
                sent += text.chars().count();
                if blocked {
                    let _ = send(completion.chunk(&id, ("", sent), &[], true, Some(StopReason::GuardrailIntervened)))
                        .await
                        && frames.sse("[DONE]").await;
                    return;
                }
            }
            Ok(Some(Piece::Done(output))) => {
                finish(&frames, &completion, &id, &output).await;
                return;
            }
            Ok(None) => return,
            Err(error) => {
                generation.count_stream_error(&error);
                let body = serde_json::json!({"error": {"message": error.to_string(), "type": "server_error", "code": error.kind()}});
                let _ = frames.sse(&body.to_string()).await;
                return;
            }
        }
    }
}

async fn finish(frames: &Frames, completion: &Completion, id: &str, output: &TextOutput) -> bool {
    let none: &[TokenLogprob] = &[];
    let stop = if completion.score_only { StopReason::MaxTokens } else { output.stop_reason };
    frames.sse(&completion.chunk(id, ("", 0), none, true, Some(stop)).to_string()).await
        && (!completion.include_usage || frames.sse(&completion.usage_chunk(id, output).to_string()).await)
        && frames.sse("[DONE]").await
}
