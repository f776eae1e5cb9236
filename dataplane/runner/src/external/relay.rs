//! One Generate stream over an upstream completion stream: the upstream's chunks become the
//! runner's messages (Started on the first, token chunks, one Finished), stop sequences are
//! matched on the text with the engine's own code, and the runner's own token limit is enforced.
//! [`Relay`] is the pure state machine; [`run`] feeds it from the HTTP body and ends the upstream
//! request (by dropping it) when the client goes away, the deadline passes or the relay is done.

use std::time::Instant;

use mantle_engine::stop::{find_stop, safe_prefix_len};
use mantle_proto::{
    FinishReason, Finished, GenerateResponse, Started, TokenChunk, TokenLogprob, Usage, generate_response,
};
use tokio::sync::mpsc;
use tonic::Status;

use super::openai::{Chunk, Logprob, parse_chunk};
use super::sse::Decoder;
use crate::metrics::Metrics;

/// What the relay needs from the request.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub stop_sequences: Vec<String>,
    /// The output tokens the request may generate (Started's `max_tokens`).
    pub max_tokens: u32,
    /// The runner stops the stream after this many tokens itself (the upstream was given no limit).
    pub local_max_tokens: Option<u32>,
    pub logprobs: bool,
}

/// The stream's state between upstream chunks.
#[derive(Debug)]
pub struct Relay {
    limits: Limits,
    started: bool,
    /// Text received but not yet sent: it may be the start of a stop sequence.
    held: String,
    /// Content chunks seen (a token each, on every server we know), for when no usage comes.
    chunks: u32,
    usage: Option<Usage>,
    finish: Option<FinishReason>,
    done: bool,
}

impl Relay {
    pub fn new(limits: Limits) -> Self {
        Self { limits, started: false, held: String::new(), chunks: 0, usage: None, finish: None, done: false }
    }

    /// The stream has ended (Finished was produced); further chunks are ignored.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn output_tokens(&self) -> u32 {
        self.usage.as_ref().map_or(0, |u| u.output_tokens).max(self.chunks)
    }

    fn started(&mut self, out: &mut Vec<GenerateResponse>) {
        if !self.started {
            self.started = true;
            let input_tokens = self.usage.as_ref().map_or(0, |u| u.input_tokens);
            out.push(message(generate_response::Event::Started(Started {
                input_tokens,
                max_tokens: self.limits.max_tokens,
            })));
        }
    }

    fn finished(&mut self, reason: FinishReason, stop_sequence: String, out: &mut Vec<GenerateResponse>) {
        self.started(out);
        let mut usage = self.usage.unwrap_or_default();
        usage.output_tokens = self.output_tokens();
        self.done = true;
        out.push(message(generate_response::Event::Finished(Finished {
            reason: reason as i32,
            stop_sequence,
            usage: Some(usage),
        })));
    }

    /// One upstream chunk in; the messages to send out.
    pub fn on_chunk(&mut self, chunk: Chunk) -> Vec<GenerateResponse> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        let content = !chunk.text.is_empty() || !chunk.logprobs.is_empty();
        if chunk.usage.is_some() || content || chunk.finish_reason.is_some() {
            // Not on a bare role chunk: llama.cpp counts the prompt on the first token's chunk.
            if let Some(u) = chunk.usage {
                self.usage = Some(u);
            }
            self.started(&mut out);
        }
        if content {
            self.chunks += 1;
            self.held.push_str(&chunk.text);
            let stop = find_stop(&self.held, &self.limits.stop_sequences);
            let emit = match &stop {
                Some((at, _)) => *at,
                None => safe_prefix_len(&self.held, &self.limits.stop_sequences),
            };
            let text: String = self.held.drain(..emit).collect();
            out.push(self.token_chunk(text, &chunk.logprobs));
            if let Some((_, sequence)) = stop {
                self.held.clear();
                self.finished(FinishReason::StopSequence, sequence, &mut out);
                return out;
            }
            if self.limits.local_max_tokens.is_some_and(|max| self.output_tokens() >= max) {
                self.flush(&mut out);
                self.finished(FinishReason::MaxTokens, String::new(), &mut out);
                return out;
            }
        }
        if let Some(reason) = chunk.finish_reason {
            // The usage chunk may still come: keep reading until the stream ends.
            self.finish = Some(match reason.as_str() {
                "length" => FinishReason::MaxTokens,
                _ => FinishReason::EndTurn,
            });
        }
        out
    }

    /// Sends what is held: the stream ended without completing a stop sequence.
    fn flush(&mut self, out: &mut Vec<GenerateResponse>) {
        if !self.held.is_empty() {
            let text = std::mem::take(&mut self.held);
            out.push(message(generate_response::Event::Token(TokenChunk { text, ..Default::default() })));
        }
    }

    /// The upstream stream ended (`[DONE]`, or the body's end): the last messages, or an error when
    /// it ended before saying how the generation finished.
    pub fn on_end(&mut self) -> Result<Vec<GenerateResponse>, Status> {
        let mut out = Vec::new();
        if self.done {
            return Ok(out);
        }
        let Some(reason) = self.finish else {
            return Err(Status::unavailable("the upstream's stream ended before the generation finished"));
        };
        self.flush(&mut out);
        self.finished(reason, String::new(), &mut out);
        Ok(out)
    }

    fn token_chunk(&self, text: String, logprobs: &[Logprob]) -> GenerateResponse {
        let mut chunk = TokenChunk { text, ..Default::default() };
        if self.limits.logprobs {
            chunk.logprobs = logprobs.iter().map(|l| l.logprob).collect();
            if logprobs.iter().all(|l| l.token_id > 0) {
                chunk.token_ids = logprobs.iter().map(|l| l.token_id).collect();
            }
            chunk.token_logprobs = logprobs.iter().map(token_logprob).collect();
        }
        message(generate_response::Event::Token(chunk))
    }
}

fn token_logprob(l: &Logprob) -> TokenLogprob {
    TokenLogprob {
        token: l.token.clone(),
        logprob: l.logprob,
        token_id: l.token_id,
        top: l.top.iter().map(token_logprob).collect(),
    }
}

fn message(event: generate_response::Event) -> GenerateResponse {
    GenerateResponse { event: Some(event) }
}

/// Relays `response` (an upstream completion stream) to `tx` until it finishes, the client drops
/// the stream, or `deadline` passes. Returning drops the response, which closes the upstream
/// connection: vLLM and llama.cpp's server abort a request whose client went away.
pub async fn run(
    mut response: reqwest::Response,
    mut relay: Relay,
    tx: mpsc::Sender<Result<GenerateResponse, Status>>,
    deadline: Option<Instant>,
    metrics: Metrics,
) {
    let accepted = Instant::now();
    let mut decoder = Decoder::default();
    let deadline = deadline.map(tokio::time::Instant::from_std);
    let mut upstream_done = false;
    let outcome = 'stream: loop {
        let next = tokio::select! {
            biased;
            _ = tx.closed() => break 'stream "cancelled",
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                let _ = tx.send(Err(Status::deadline_exceeded("the request's deadline passed before it finished"))).await;
                break 'stream "deadline_exceeded";
            }
            next = response.chunk() => next,
        };
        let events = match next {
            Ok(Some(bytes)) => decoder.feed(&bytes),
            Ok(None) => Ok(vec!["[DONE]".to_string()]),
            Err(e) => {
                let _ = tx.send(Err(Status::unavailable(format!("the upstream's stream broke: {e}")))).await;
                break 'stream "failed";
            }
        };
        let events = match events {
            Ok(events) => events,
            Err(e) => {
                let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                break 'stream "failed";
            }
        };
        for event in events {
            let messages = if event.trim() == "[DONE]" {
                upstream_done = true;
                relay.on_end()
            } else {
                parse_chunk(&event)
                    .map(|chunk| relay.on_chunk(chunk))
                    .map_err(|e| Status::unavailable(format!("the upstream failed the request: {e}")))
            };
            let messages = match messages {
                Ok(m) => m,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    break 'stream "failed";
                }
            };
            for m in messages {
                match &m.event {
                    Some(generate_response::Event::Started(_)) => {
                        metrics.time_to_first_token.observe(accepted.elapsed().as_secs_f64())
                    }
                    Some(generate_response::Event::Finished(f)) => {
                        let usage = f.usage.unwrap_or_default();
                        metrics.prompt_tokens.inc_by(usage.input_tokens.into());
                        metrics.generated_tokens.inc_by(usage.output_tokens.into());
                    }
                    _ => {}
                }
                let finished = match &m.event {
                    Some(generate_response::Event::Finished(f)) => Some(f.reason()),
                    _ => None,
                };
                if tx.send(Ok(m)).await.is_err() {
                    break 'stream "cancelled";
                }
                if let Some(reason) = finished {
                    break 'stream match reason {
                        FinishReason::MaxTokens => "max_tokens",
                        FinishReason::StopSequence => "stop_sequence",
                        _ => "end_turn",
                    };
                }
            }
        }
    };
    if upstream_done {
        // Read the body's end, so the connection goes back to the pool for the next request
        // (the client already has its Finished).
        let _ = tokio::time::timeout(std::time::Duration::from_millis(100), response.chunk()).await;
    }
    metrics.requests.with_label_values(&[outcome]).inc();
    tracing::debug!(outcome, "generation ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(text: &str) -> Chunk {
        Chunk { text: text.into(), ..Default::default() }
    }

    fn texts(out: &[GenerateResponse]) -> String {
        out.iter()
            .filter_map(|m| match &m.event {
                Some(generate_response::Event::Token(t)) => Some(t.text.as_str()),
                _ => None,
            })
            .collect()
    }

    fn finished(out: &[GenerateResponse]) -> Option<Finished> {
        out.iter().find_map(|m| match &m.event {
            Some(generate_response::Event::Finished(f)) => Some(f.clone()),
            _ => None,
        })
    }

    #[test]
    fn started_comes_first_with_the_prompt_tokens_the_upstream_reported() {
        let mut relay = Relay::new(Limits { max_tokens: 64, ..Default::default() });
        let usage = Usage { input_tokens: 12, output_tokens: 0, cached_prompt_tokens: 8 };
        let out = relay.on_chunk(Chunk { usage: Some(usage), ..Default::default() });
        assert!(
            matches!(
                &out[..],
                [GenerateResponse {
                    event: Some(generate_response::Event::Started(Started { input_tokens: 12, max_tokens: 64 }))
                }]
            ),
            "{out:?}"
        );
        let out = relay.on_chunk(chunk("Hi"));
        assert_eq!(texts(&out), "Hi");
        relay.on_chunk(Chunk { finish_reason: Some("stop".into()), ..Default::default() });
        relay.on_chunk(Chunk {
            usage: Some(Usage { input_tokens: 12, output_tokens: 2, cached_prompt_tokens: 8 }),
            ..Default::default()
        });
        let end = relay.on_end().unwrap();
        let f = finished(&end).unwrap();
        assert_eq!(f.reason(), FinishReason::EndTurn);
        assert_eq!(f.usage, Some(Usage { input_tokens: 12, output_tokens: 2, cached_prompt_tokens: 8 }));
    }

    #[test]
    fn a_stop_sequence_split_over_chunks_ends_the_stream_without_its_text() {
        let limits = Limits { stop_sequences: vec!["END".into()], max_tokens: 100, ..Default::default() };
        let mut relay = Relay::new(limits);
        let mut out = Vec::new();
        for piece in ["one E", "N", "D two"] {
            out.extend(relay.on_chunk(chunk(piece)));
            if relay.is_done() {
                break;
            }
        }
        assert_eq!(texts(&out), "one ");
        let f = finished(&out).unwrap();
        assert_eq!((f.reason(), f.stop_sequence.as_str()), (FinishReason::StopSequence, "END"));
        assert_eq!(f.usage.unwrap().output_tokens, 3, "counted from chunks without usage");
        assert!(relay.on_chunk(chunk("more")).is_empty(), "nothing after Finished");
        // Held-back text that never became a stop sequence is sent at the end.
        let mut relay = Relay::new(Limits { stop_sequences: vec!["END".into()], ..Default::default() });
        let mut out = relay.on_chunk(chunk("tail E"));
        out.extend(relay.on_chunk(Chunk { finish_reason: Some("length".into()), ..Default::default() }));
        out.extend(relay.on_end().unwrap());
        assert_eq!(texts(&out), "tail E");
        assert_eq!(finished(&out).unwrap().reason(), FinishReason::MaxTokens);
    }

    #[test]
    fn the_runners_own_limit_ends_an_unlimited_upstream_request() {
        let mut relay = Relay::new(Limits { max_tokens: 2, local_max_tokens: Some(2), ..Default::default() });
        let mut out = relay.on_chunk(chunk("a"));
        assert!(!relay.is_done());
        out.extend(relay.on_chunk(chunk("b")));
        assert!(relay.is_done());
        assert_eq!(texts(&out), "ab");
        assert_eq!(finished(&out).unwrap().reason(), FinishReason::MaxTokens);
    }

    #[test]
    fn a_stream_cut_before_its_finish_is_unavailable() {
        let mut relay = Relay::new(Limits::default());
        relay.on_chunk(chunk("partial"));
        assert_eq!(relay.on_end().unwrap_err().code(), tonic::Code::Unavailable);
    }

    #[test]
    fn logprobs_ride_on_their_chunk_when_asked_for() {
        let lp = Logprob { token: b"Hi".to_vec(), logprob: -0.5, token_id: 42, top: Vec::new() };
        let with = Chunk { text: "Hi".into(), logprobs: vec![lp], ..Default::default() };
        let mut relay = Relay::new(Limits { logprobs: true, ..Default::default() });
        let out = relay.on_chunk(with.clone());
        let Some(generate_response::Event::Token(t)) = &out[1].event else { panic!("{out:?}") };
        assert_eq!((t.token_ids.as_slice(), t.logprobs.as_slice()), (&[42][..], &[-0.5][..]));
        assert_eq!(t.token_logprobs[0].token, b"Hi");
        let mut relay = Relay::new(Limits::default());
        let out = relay.on_chunk(with);
        let Some(generate_response::Event::Token(t)) = &out[1].event else { panic!("{out:?}") };
        assert!(t.logprobs.is_empty() && t.token_logprobs.is_empty());
    }
}
