//! Continuous batching: one scheduler owns the KV cache and the running sequences, and each
//! `step` runs one forward pass over a batch it assembles anew.
//!
//! Per step:
//! 1. Admission. Waiting sequences (highest priority first, then oldest) join while the cache has
//!    blocks for their prompt and the batch has room; a waiting sequence that outranks a running
//!    one may preempt it.
//! 2. Batch. Every decoding sequence contributes its one new token; prefilling sequences
//!    contribute prompt chunks up to `max_batch_tokens`, so a long prompt is spread over several
//!    steps and running decodes never stall behind it. Lowest-priority (batch) sequences sit out
//!    the steps in which a higher-priority prompt is prefilled: real-time requests' first tokens
//!    do not wait on them.
//! 3. Blocks. Each step first reserves the KV blocks it will write. When blocks run out, the
//!    lowest-priority running sequence (youngest among equals) is preempted: its blocks are
//!    copied to host memory (with a CRC32 each) and freed, and it goes back to the waiting queue.
//!    On resumption the copies are checked and restored; when the host budget is spent, or a
//!    copy fails its check, the sequence recomputes its tokens instead.
//! 4. Sampling. A sequence whose step reached its last token samples the next one; the step
//!    emits its text (held back while it could still be the start of a stop sequence) and ends
//!    the sequence on a stop token, a stop sequence, `max_tokens`, or a full context.
//!
//! 5. Interruption. A step made only of lowest-priority (batch) sequences stops between two
//!    layers when a higher-priority request arrives in its first half
//!    ([`Scheduler::set_interrupt`]); nothing of it advances, and the next step prefills the
//!    arrival. Past half way, finishing costs the arrival less than starting again costs the
//!    batch.
//!
//! Tunables: `block_size` (KV slots per block), `num_blocks` (cache size), `max_batch_tokens`
//! (tokens per forward pass, bounds step latency), `max_running` (sequences decoding at once),
//! `swap_bytes` (host memory for preempted sequences' blocks).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use half::f16;
use llguidance::toktrie::SimpleVob;

use crate::constraint::Constraint;
use crate::kv_cache::{BlockTable, KvCache};
use crate::model::{Logits, Scratch, Step};
use crate::sampling::{Sampled, Sampler, SamplingParams, TokenScore};
use crate::tokenizer::IncrementalDecoder;
use crate::{EngineError, TextModel};

/// Request priority: higher runs first and is preempted last.
pub type Priority = u8;
/// The highest priority level (levels are 0..=3).
pub const MAX_PRIORITY: Priority = 3;

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_sequences: Vec<String>,
    pub priority: Priority,
    /// The prefix-cache namespace: cached prompt blocks are shared only between requests with
    /// the same salt (the runner is given the tenant's). Empty is a namespace of its own, shared
    /// by every request without a salt.
    pub cache_salt: String,
    /// A grammar the reply must match (compiled by [`crate::TextModel::compile_grammar`]); the
    /// sequence ends when the grammar is complete.
    pub constraint: Option<Constraint>,
    /// Score the prompt: emit each prompt token's log-probability given the tokens before it
    /// (with `sampling.top_logprobs` alternatives), as [`Event::PromptLogprobs`]. Such a
    /// sequence computes its whole prompt (the prefix cache would skip the positions it scores).
    pub prompt_logprobs: bool,
}

impl GenerateRequest {
    /// A greedy request for `prompt` with nothing else set: no stop sequences, normal priority
    /// (1), no cache salt, grammar or prompt scores.
    pub fn greedy(id: u64, prompt: Vec<u32>, max_tokens: usize) -> Self {
        GenerateRequest {
            id,
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop_sequences: Vec::new(),
            priority: 1,
            cache_salt: String::new(),
            constraint: None,
            prompt_logprobs: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn.
    EndTurn,
    /// `max_tokens` were generated, or the context is full.
    MaxTokens,
    /// A stop sequence appeared; it is not part of the text.
    StopSequence,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: usize,
    pub output_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (empty while held back), with the most
    /// likely tokens at its place when the request asked for them.
    Token {
        id: u64,
        token: u32,
        text: String,
        logprob: f32,
        top: Vec<(u32, f32)>,
    },
    /// Scores of the prompt's tokens `first_position..first_position + tokens.len()`, in order,
    /// before any generated token; the first prompt token has nothing before it, so its
    /// log-probability is 0 and it has no alternatives.
    PromptLogprobs {
        id: u64,
        first_position: usize,
        tokens: Vec<TokenScore>,
    },
    Finished {
        id: u64,
        reason: FinishReason,
        stop_sequence: Option<String>,
        usage: Usage,
    },
    /// The sequence ended without an answer: the device failed under it.
    Failed {
        id: u64,
        error: EngineError,
    },
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_batch_tokens: usize,
    pub max_running: usize,
    pub swap_bytes: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { block_size: 16, num_blocks: 1024, max_batch_tokens: 256, max_running: 64, swap_bytes: 1 << 30 }
    }
}

/// A preempted sequence's blocks, copied to host memory.
struct Swapped {
    /// Each block's keys and values and the CRC32 of that copy.
    blocks: Vec<(Vec<f16>, u32)>,
    computed: usize,
}

impl Swapped {
    fn bytes(&self) -> usize {
        self.blocks.iter().map(|(d, _)| d.len() * std::mem::size_of::<f16>()).sum()
    }
}

fn crc(data: &[f16]) -> u32 {
    crc32fast::hash(bytemuck::cast_slice(data))
}

struct Sequence {
    req: GenerateRequest,
    /// Prompt followed by the generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    table: BlockTable,
    sampler: Sampler,
    /// The grammar's state, advanced by every generated token.
    constraint: Option<Constraint>,
    decoder: IncrementalDecoder,
    /// Generated text not yet emitted because it may begin a stop sequence.
    held: String,
    /// Admission order, for fairness among equal priorities.
    arrival: u64,
    preemptions: u32,
    /// Prompt tokens found in the prefix cache at first admission.
    cached: usize,
    /// Prompt tokens whose scores were emitted (prompt-scoring sequences).
    scored: usize,
    /// Blocks saved in host memory while preempted.
    swapped: Option<Swapped>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.req.prompt.len()
    }
}

/// Counters for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub waiting: usize,
    pub running: usize,
    pub free_blocks: usize,
    pub total_blocks: usize,
    pub preemptions: u64,
    pub generated_tokens: u64,
    /// Blocks in the prefix cache.
    pub cached_blocks: usize,
    /// Prompt tokens served from the prefix cache.
    pub prefix_hit_tokens: u64,
    /// Cached or swapped blocks found corrupt (and recomputed).
    pub kv_corruptions: u64,
    /// Preemptions that saved the sequence's blocks to host memory.
    pub swaps_out: u64,
    /// Host-memory bytes held by preempted sequences.
    pub swap_bytes: usize,
    /// Steps of lowest-priority sequences given up half way for a higher-priority arrival.
    pub interrupted_steps: u64,
}

pub struct Scheduler {
    model: Arc<TextModel>,
    cache: KvCache,
    scratch: Scratch,
    config: SchedulerConfig,
    waiting: Vec<Sequence>,
    running: Vec<Sequence>,
    arrivals: u64,
    preemptions: u64,
    generated_tokens: u64,
    prefix_hit_tokens: u64,
    swaps_out: u64,
    swap_bytes: usize,
    /// Set (by whoever queues requests) when a request above the lowest priority arrives: a step
    /// of lowest-priority sequences only then stops between two layers, so the arrival need not
    /// wait for it.
    interrupt: Option<Arc<AtomicBool>>,
    interrupted_steps: u64,
}

impl Scheduler {
    /// A scheduler over `model`, its KV cache allocated where the model runs (which can fail on
    /// a device without the memory).
    pub fn new(model: Arc<TextModel>, config: SchedulerConfig) -> Result<Self, EngineError> {
        let cache = model.model.new_cache(config.block_size, config.num_blocks)?;
        Ok(Self {
            model,
            cache,
            scratch: Scratch::default(),
            config,
            waiting: Vec::new(),
            running: Vec::new(),
            arrivals: 0,
            preemptions: 0,
            generated_tokens: 0,
            prefix_hit_tokens: 0,
            swaps_out: 0,
            swap_bytes: 0,
            interrupt: None,
            interrupted_steps: 0,
        })
    }

    /// The flag that interrupts a step of lowest-priority sequences (see [`Self::step`]). The
    /// setter raises it when it queues a higher-priority request; the flag is lowered when such
    /// a request is added.
    pub fn set_interrupt(&mut self, flag: Arc<AtomicBool>) {
        self.interrupt = Some(flag);
    }

    pub fn model(&self) -> &Arc<TextModel> {
        &self.model
    }

    /// Checks a request against the model's context and queues it.
    pub fn add(&mut self, mut req: GenerateRequest) -> Result<(), EngineError> {
        if req.priority > 0
            && let Some(flag) = &self.interrupt
        {
            flag.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        let context_length =
            self.model.model.config.context_length.min(self.config.num_blocks * self.config.block_size);
        let prompt_tokens = req.prompt.len();
        if prompt_tokens == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt_tokens >= context_length {
            return Err(EngineError::PromptTooLong { prompt_tokens, context_length });
        }
        let available = context_length - prompt_tokens;
        if req.max_tokens == 0 || req.max_tokens > available {
            return Err(EngineError::InvalidMaxTokens {
                max_tokens: req.max_tokens,
                available,
                prompt_tokens,
                context_length,
            });
        }
        let sampler = Sampler::new(req.sampling.clone());
        let table = BlockTable::salted(self.cache.namespace(req.cache_salt.as_bytes()));
        self.arrivals += 1;
        let constraint = req.constraint.take();
        self.waiting.push(Sequence {
            tokens: req.prompt.clone(),
            req,
            computed: 0,
            table,
            sampler,
            constraint,
            decoder: IncrementalDecoder::default(),
            held: String::new(),
            arrival: self.arrivals,
            preemptions: 0,
            cached: 0,
            scored: 0,
            swapped: None,
        });
        Ok(())
    }

    /// Drops a request wherever it is, freeing its blocks at once. Returns whether it was known.
    pub fn cancel(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            let mut seq = self.waiting.remove(i);
            seq.table.release(&mut self.cache);
            if let Some(swapped) = seq.swapped.take() {
                self.swap_bytes -= swapped.bytes();
            }
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.req.id == id) {
            let mut seq = self.running.remove(i);
            seq.table.release(&mut self.cache);
            return true;
        }
        false
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            waiting: self.waiting.len(),
            running: self.running.len(),
            free_blocks: self.cache.free_blocks(),
            total_blocks: self.cache.num_blocks(),
            preemptions: self.preemptions,
            generated_tokens: self.generated_tokens,
            cached_blocks: self.cache.cached_blocks(),
            prefix_hit_tokens: self.prefix_hit_tokens,
            kv_corruptions: self.cache.corruptions(),
            swaps_out: self.swaps_out,
            swap_bytes: self.swap_bytes,
            interrupted_steps: self.interrupted_steps,
        }
    }

    /// Fault injection for tests and drills: flips a bit in a preempted sequence's host copy.
    pub fn corrupt_swapped_block(&mut self) -> bool {
        let Some((data, _)) =
            self.waiting.iter_mut().find_map(|s| s.swapped.as_mut()).and_then(|w| w.blocks.first_mut())
        else {
            return false;
        };
        data[0] = f16::from_bits(data[0].to_bits() ^ 0x0200);
        true
    }

    /// Checks up to `max_blocks` cached blocks against their checksums; sequences holding a
    /// corrupt block go back to the queue and recompute it. Each step checks one block.
    pub fn sweep(&mut self, max_blocks: usize) {
        for block in self.cache.sweep(max_blocks) {
            while let Some(i) = self.running.iter().position(|s| s.table.contains(block)) {
                tracing::warn!(block, sequence = self.running[i].req.id, "KV block failed its checksum; recomputing");
                self.preempt(i);
            }
        }
    }

    /// Fault injection for tests and drills: flips a bit in the `nth` cached block.
    pub fn corrupt_cached_block(&mut self, nth: usize) -> bool {
        match self.cache.registered_blocks().get(nth) {
            Some(&block) => {
                self.cache.flip_bit(block, 0);
                true
            }
            None => false,
        }
    }

    /// Runs one batch and returns what happened.
    pub fn step(&mut self) -> Vec<Event> {
        self.sweep(1);
        self.admit();
        let plan = self.plan_batch();
        if plan.is_empty() {
            return Vec::new();
        }
        // Sequences whose step reaches their last token sample a next one; the constrained among
        // them compute their grammar masks on another thread while the forward pass runs.
        let samples = |s: &Sequence, n: usize| s.computed + n == s.tokens.len();
        let mut constrained: Vec<(usize, Constraint)> = Vec::new();
        for &(i, n) in &plan {
            if samples(&self.running[i], n)
                && let Some(c) = self.running[i].constraint.take()
            {
                constrained.push((i, c));
            }
        }
        let scores = |s: &Sequence| s.req.prompt_logprobs && s.scored < s.req.prompt.len();
        let steps: Vec<Step<'_>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                Step {
                    tokens: &s.tokens[s.computed..s.computed + n],
                    start: s.computed,
                    blocks: s.table.blocks(),
                    logits: samples(s, n),
                    all_logits: scores(s),
                }
            })
            .collect();
        // Each step's rows of logits, and where they begin.
        let step_rows: Vec<usize> = steps.iter().map(Step::rows).collect();
        let row_starts: Vec<usize> = step_rows
            .iter()
            .scan(0, |next, &rows| {
                let at = *next;
                *next += rows;
                Some(at)
            })
            .collect();
        // A step of lowest-priority sequences only gives way to a higher-priority arrival.
        let background = plan.iter().all(|&(i, _)| self.running[i].req.priority == 0);
        let interrupt = self.interrupt.as_deref().filter(|_| background);
        let (model, cache, scratch) = (&self.model, &mut self.cache, &mut self.scratch);
        let (logits, masks) = std::thread::scope(|scope| {
            let masks = (!constrained.is_empty())
                .then(|| scope.spawn(|| constrained.iter_mut().map(|(_, c)| c.mask()).collect::<Vec<_>>()));
            let logits = model.model.forward_unless(&steps, cache, scratch, interrupt);
            (logits, masks.map(|m| m.join()))
        });
        drop(steps);
        let logits = match logits {
            Ok(Some(logits)) => logits,
            Ok(None) => {
                // Given up for an arrival: nothing advanced; the grammars wait as they were.
                for (i, constraint) in constrained {
                    self.running[i].constraint = Some(constraint);
                }
                self.interrupted_steps += 1;
                return Vec::new();
            }
            Err(error) => return self.fail(&plan, &error),
        };
        let masks = match masks {
            Some(Ok(masks)) => masks,
            Some(Err(_)) => vec![Err(EngineError::Grammar("the grammar mask panicked".into())); constrained.len()],
            None => Vec::new(),
        };
        for ((i, constraint), mask) in constrained.into_iter().zip(masks) {
            let seq = &mut self.running[i];
            let mask = mask.unwrap_or_else(|e| {
                // Cannot happen while the grammar accepted every token so far; end the reply
                // rather than let it leave the grammar.
                tracing::warn!(sequence = seq.req.id, error = %e, "grammar mask failed; ending the sequence");
                let mut eos = SimpleVob::alloc(self.model.model.config.vocab);
                eos.allow_token(self.model.tokenizer.eos());
                eos
            });
            seq.sampler.restrict_next(mask);
            seq.constraint = Some(constraint);
        }
        let mut events = Self::score_prompts(&self.model, &mut self.running, &plan, &row_starts, &logits);
        // The sequences whose step reached their last token, in step order, with their row of
        // logits (the step's last); each samples its next token.
        let mut sampling = Vec::new();
        let mut rows = Vec::new();
        for (k, &(i, n)) in plan.iter().enumerate() {
            let seq = &mut self.running[i];
            seq.computed += n;
            seq.table.register_full(&mut self.cache, &seq.tokens, seq.computed);
            if seq.computed == seq.tokens.len() {
                sampling.push(i);
                rows.push(row_starts[k] + step_rows[k] - 1);
            }
        }
        let mut samplers: Vec<Option<&mut Sampler>> = self.running.iter_mut().map(|s| Some(&mut s.sampler)).collect();
        let mut samplers: Vec<&mut Sampler> = sampling.iter().filter_map(|&i| samplers[i].take()).collect();
        let sampled = self.model.model.sample(&logits, &rows, &mut samplers);
        let mut finished = Vec::new();
        for (&i, s) in sampling.iter().zip(sampled) {
            self.running[i].tokens.push(s.token);
            self.generated_tokens += 1;
            let complete = self.advance_grammar(i, s.token);
            if let Some(event) = self.finish_or_emit(i, s, complete, &mut events) {
                finished.push((i, event));
            }
        }
        // Remove finished sequences from the back so indices stay valid.
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, event) in finished {
            let mut seq = self.running.remove(i);
            seq.table.release(&mut self.cache);
            events.push(event);
        }
        events
    }

    /// Ends the planned sequences with `error` (the forward pass failed on the device): their
    /// blocks are freed, and nothing of theirs is retried here.
    fn fail(&mut self, plan: &[(usize, usize)], error: &EngineError) -> Vec<Event> {
        tracing::error!(%error, sequences = plan.len(), "the forward pass failed; ending its sequences");
        let mut failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
        failed.sort_unstable_by(|a, b| b.cmp(a));
        failed
            .into_iter()
            .map(|i| {
                let mut seq = self.running.remove(i);
                seq.table.release(&mut self.cache);
                Event::Failed { id: seq.req.id, error: error.clone() }
            })
            .collect()
    }

    /// The prompt scores this step computed: for each prompt-scoring step, the tokens after the
    /// positions it ran (row `j` is the distribution of the token after position `start + j`),
    /// from the first one not yet emitted. Runs before the steps' `computed` advance.
    fn score_prompts(
        model: &TextModel,
        running: &mut [Sequence],
        plan: &[(usize, usize)],
        row_starts: &[usize],
        logits: &Logits<'_>,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        for (k, &(i, n)) in plan.iter().enumerate() {
            let seq = &running[i];
            let (prompt, c) = (&seq.req.prompt, seq.computed);
            if !(seq.req.prompt_logprobs && seq.scored < prompt.len()) {
                continue;
            }
            // Positions scored now: those after the ones this step runs, not emitted before
            // (a sequence preempted and recomputed runs some positions twice).
            let (start, end) = ((c + 1).max(seq.scored).max(1), (c + n + 1).min(prompt.len()));
            let mut tokens = Vec::new();
            let first_position = if seq.scored == 0 {
                tokens.push(TokenScore { token: prompt[0], logprob: 0.0, top: Vec::new() });
                0
            } else {
                start
            };
            let pairs: Vec<(usize, u32)> = (start..end).map(|p| (row_starts[k] + p - 1 - c, prompt[p])).collect();
            tokens.extend(model.model.score(logits, &pairs, seq.req.sampling.top_logprobs));
            if tokens.is_empty() {
                continue;
            }
            let id = seq.req.id;
            let seq = &mut running[i];
            seq.scored = seq.scored.max(end).max(1);
            events.push(Event::PromptLogprobs { id, first_position, tokens });
        }
        events
    }

    /// Moves a constrained sequence's grammar past its new token; true when the grammar is
    /// complete, so the sequence ends here.
    fn advance_grammar(&mut self, i: usize, token: u32) -> bool {
        let stop = self.model.tokenizer.is_stop_token(token);
        let seq = &mut self.running[i];
        let Some(constraint) = seq.constraint.as_mut() else { return false };
        if stop {
            return false;
        }
        match constraint.commit(token) {
            Ok(()) => constraint.is_finished(),
            Err(e) => {
                tracing::warn!(sequence = seq.req.id, error = %e, "the grammar refused a sampled token; ending the sequence");
                true
            }
        }
    }

    /// Emits the token's text, or ends the sequence (returning its `Finished` event).
    /// `complete` ends it after this token: its grammar allows nothing more.
    fn finish_or_emit(&mut self, i: usize, sampled: Sampled, complete: bool, events: &mut Vec<Event>) -> Option<Event> {
        let Sampled { token, logprob, top } = sampled;
        let context_length =
            self.model.model.config.context_length.min(self.cache.num_blocks() * self.config.block_size);
        let tokenizer = &self.model.tokenizer;
        let seq = &mut self.running[i];
        let id = seq.req.id;
        let usage = |seq: &Sequence| Usage {
            input_tokens: seq.req.prompt.len(),
            output_tokens: seq.generated(),
            cached_tokens: seq.cached,
        };
        if tokenizer.is_stop_token(token) {
            seq.tokens.pop();
            let text = std::mem::take(&mut seq.held);
            if !text.is_empty() {
                events.push(Event::Token { id, token, text, logprob, top });
            }
            return Some(Event::Finished { id, reason: FinishReason::EndTurn, stop_sequence: None, usage: usage(seq) });
        }
        let delta = seq.decoder.push(tokenizer, token).unwrap_or_default();
        seq.held.push_str(&delta);
        if let Some((at, stop)) = crate::stop::find_stop(&seq.held, &seq.req.stop_sequences) {
            let text = seq.held[..at].to_string();
            seq.held.clear();
            events.push(Event::Token { id, token, text, logprob, top });
            return Some(Event::Finished {
                id,
                reason: FinishReason::StopSequence,
                stop_sequence: Some(stop),
                usage: usage(seq),
            });
        }
        let out_of_room = seq.generated() >= seq.req.max_tokens || seq.tokens.len() >= context_length;
        let ends = complete || out_of_room;
        let emit_len =
            if ends { seq.held.len() } else { crate::stop::safe_prefix_len(&seq.held, &seq.req.stop_sequences) };
        let text: String = seq.held.drain(..emit_len).collect();
        events.push(Event::Token { id, token, text, logprob, top });
        ends.then(|| Event::Finished {
            id,
            reason: if complete { FinishReason::EndTurn } else { FinishReason::MaxTokens },
            stop_sequence: None,
            usage: usage(seq),
        })
    }

    /// Moves waiting sequences into the running set, best first, while they fit.
    fn admit(&mut self) {
        self.waiting.sort_by_key(|s| (std::cmp::Reverse(s.req.priority), s.arrival));
        while !self.waiting.is_empty() && self.running.len() < self.config.max_running {
            let candidate = &self.waiting[0];
            // Room for the whole prompt (it will be prefilled over the next steps) plus one
            // block of headroom per running sequence, so admission does not force preemption.
            let needed = candidate.tokens.len().div_ceil(self.config.block_size) + self.running.len();
            if needed > self.cache.free_blocks() {
                let Some(victim) = self.lowest_running() else { break };
                if self.running[victim].req.priority >= candidate.req.priority {
                    break;
                }
                self.preempt(victim);
                continue;
            }
            let mut seq = self.waiting.remove(0);
            if let Some(swapped) = seq.swapped.take() {
                self.swap_in(&mut seq, swapped);
                self.running.push(seq);
                continue;
            }
            let matched = self.reuse_prefix(&mut seq);
            seq.computed = matched;
            if seq.preemptions == 0 {
                seq.cached = matched;
                self.prefix_hit_tokens += matched as u64;
            }
            self.running.push(seq);
        }
    }

    /// The running sequence to give up first: lowest priority, then latest arrival.
    fn lowest_running(&self) -> Option<usize> {
        (0..self.running.len())
            .min_by_key(|&i| (self.running[i].req.priority, std::cmp::Reverse(self.running[i].arrival)))
    }

    /// Frees a running sequence's blocks and queues it again: its blocks go to host memory when
    /// the swap budget allows, otherwise it will recompute them.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        let bytes = seq.table.blocks().len() * self.cache.block_values() * std::mem::size_of::<f16>();
        if seq.computed > 0 && self.swap_bytes + bytes <= self.config.swap_bytes {
            let blocks: Result<Vec<_>, _> = seq
                .table
                .blocks()
                .iter()
                .map(|&b| {
                    self.cache.copy_out(b).map(|data| {
                        let sum = crc(&data);
                        (data, sum)
                    })
                })
                .collect();
            match blocks {
                Ok(blocks) => {
                    seq.swapped = Some(Swapped { blocks, computed: seq.computed });
                    self.swap_bytes += bytes;
                    self.swaps_out += 1;
                }
                Err(e) => {
                    tracing::warn!(sequence = seq.req.id, error = %e, "swapping out failed; the sequence will recompute")
                }
            }
        }
        seq.table.release(&mut self.cache);
        seq.computed = 0;
        seq.preemptions += 1;
        self.preemptions += 1;
        self.waiting.push(seq);
    }

    /// Restores a preempted sequence's blocks from host memory, checking each copy's CRC; on a
    /// mismatch (or no room) the sequence recomputes instead.
    fn swap_in(&mut self, seq: &mut Sequence, swapped: Swapped) {
        self.swap_bytes -= swapped.bytes();
        let bs = self.config.block_size;
        if seq.table.reserve(&mut self.cache, swapped.blocks.len() * bs).is_ok() {
            let intact = swapped.blocks.iter().all(|(data, sum)| crc(data) == *sum);
            if intact {
                let restored = seq
                    .table
                    .blocks()
                    .iter()
                    .zip(&swapped.blocks)
                    .try_for_each(|(&block, (data, _))| self.cache.copy_in(block, data));
                match restored {
                    Ok(()) => {
                        seq.computed = swapped.computed;
                        return;
                    }
                    Err(e) => tracing::warn!(sequence = seq.req.id, error = %e, "swapping in failed; recomputing"),
                }
            } else {
                tracing::warn!(sequence = seq.req.id, "a swapped-out KV block failed its checksum; recomputing");
                self.cache.record_corruption();
            }
            seq.table.release(&mut self.cache);
        }
        seq.computed = self.reuse_prefix(seq);
    }

    /// Takes the sequence's longest cached prefix: the tokens it need not compute. A sequence
    /// that scores its prompt computes it all, as each position's logits are what it reports.
    fn reuse_prefix(&mut self, seq: &mut Sequence) -> usize {
        if seq.req.prompt_logprobs && seq.scored < seq.req.prompt.len() {
            0
        } else {
            seq.table.match_prefix(&mut self.cache, &seq.tokens)
        }
    }

    /// Chooses (running index, tokens) for this step and reserves their blocks, preempting when
    /// the cache is full. Decodes come first, then prompt chunks in priority order.
    ///
    /// Background work yields: while a sequence above the lowest priority prefills, the
    /// lowest-priority sequences (batch jobs) sit the step out, so that prompt's step is as short
    /// as it would be alone and its first token is not delayed by them. (Letting their decodes
    /// ride along measured worse for the first token and no better for the batch.)
    fn plan_batch(&mut self) -> Vec<(usize, usize)> {
        self.running.sort_by_key(|s| (std::cmp::Reverse(s.req.priority), s.arrival));
        loop {
            let mut budget = self.config.max_batch_tokens;
            let mut plan = Vec::new();
            let decoding = |s: &Sequence| s.tokens.len() - s.computed == 1;
            let urgent = self.running.iter().any(|s| !decoding(s) && s.req.priority > 0);
            let sits_out = |s: &Sequence| urgent && s.req.priority == 0;
            let order: Vec<usize> = (0..self.running.len())
                .filter(|&i| decoding(&self.running[i]))
                .chain((0..self.running.len()).filter(|&i| !decoding(&self.running[i])))
                .filter(|&i| !sits_out(&self.running[i]))
                .collect();
            for i in order {
                if budget == 0 {
                    break;
                }
                let s = &self.running[i];
                let n = (s.tokens.len() - s.computed).min(budget);
                budget -= n;
                plan.push((i, n));
            }
            let mut short = None;
            for &(i, n) in &plan {
                let s = &mut self.running[i];
                if s.table.reserve(&mut self.cache, s.computed + n).is_err() {
                    short = Some(i);
                    break;
                }
            }
            match short {
                None => return plan,
                Some(_) => {
                    let Some(victim) = self.lowest_running() else { return Vec::new() };
                    self.preempt(victim);
                    if self.running.is_empty() {
                        return Vec::new();
                    }
                }
            }
        }
    }
}
