//! Where guardrails plug into the request path.
//!
//! - **Input guards** run concurrently with queueing (the design's speculative execution): the
//!   request waits for a slot and for its input check at the same time, and a blocked input
//!   gives the slot back without reaching a runner.
//! - **Output guards** see the reply as it streams, delta by delta, and can pass it, rewrite it
//!   (masking) or stop it.
//!
//! Guardrail resources compile into implementations of these traits (the guardrails issue);
//! with none configured both stages pass everything through at no cost.

use std::sync::Arc;

use crate::adapters::{StopReason, TextOutput};
use crate::error::ApiError;
use crate::inference::Ctx;

/// What an output guard decides about a delta.
#[derive(Debug, PartialEq)]
pub enum OutputVerdict {
    Pass,
    /// Replace the delta (for example with masked PII).
    Rewrite(String),
    /// Stop the reply here with the given message.
    Block(String),
}

/// Checks a request's input before it runs.
pub trait InputGuard: Send + Sync {
    fn check(&self, ctx: &Ctx, prompt: &str) -> Result<(), ApiError>;
}

/// Checks a reply while it streams.
pub trait OutputGuard: Send + Sync {
    fn check(&self, ctx: &Ctx, text_so_far: &str, delta: &str) -> OutputVerdict;
}

/// The guards in force.
#[derive(Default, Clone)]
pub struct Guards {
    pub input: Vec<Arc<dyn InputGuard>>,
    pub output: Vec<Arc<dyn OutputGuard>>,
}

impl Guards {
    /// Runs every input guard (while the request also waits in its queue).
    pub async fn check_input(&self, ctx: &Ctx, prompt: &str) -> Result<(), ApiError> {
        for guard in &self.input {
            guard.check(ctx, prompt)?;
        }
        Ok(())
    }

    /// Runs every output guard over a delta; the first that does not pass decides.
    pub fn check_output(&self, ctx: &Ctx, text_so_far: &str, delta: &str) -> OutputVerdict {
        for guard in &self.output {
            match guard.check(ctx, text_so_far, delta) {
                OutputVerdict::Pass => continue,
                other => return other,
            }
        }
        OutputVerdict::Pass
    }
}

/// Text after the output guards: what to send, and whether the reply stops here (every API
/// then reports the intervention: Converse `guardrail_intervened`, OpenAI `content_filter`).
#[derive(Debug, PartialEq)]
pub struct Guarded {
    pub text: String,
    pub blocked: bool,
}

impl Guards {
    /// The one place an output verdict is applied to a delta: passed as is, rewritten, or
    /// replaced by the block message with the reply stopping.
    pub fn guard(&self, ctx: &Ctx, text_so_far: &str, delta: String) -> Guarded {
        match self.check_output(ctx, text_so_far, &delta) {
            OutputVerdict::Pass => Guarded { text: delta, blocked: false },
            OutputVerdict::Rewrite(text) => Guarded { text, blocked: false },
            OutputVerdict::Block(message) => Guarded { text: message, blocked: true },
        }
    }

    /// The same for a whole reply: a block replaces the text, drops any tool call and sets the
    /// stop reason.
    pub fn guard_reply(&self, ctx: &Ctx, output: &mut TextOutput) {
        let guarded = self.guard(ctx, "", std::mem::take(&mut output.text));
        output.text = guarded.text;
        if guarded.blocked {
            output.tool_call = None;
            output.stop_reason = StopReason::GuardrailIntervened;
        }
    }
}

/// Refuses a request that names a guardrail (Converse `guardrailConfig`, InvokeModel's
/// `X-Amzn-Bedrock-GuardrailIdentifier`): no Guardrail is loaded into the request path yet, so
/// every identifier is unknown — refused, never silently ignored.
pub fn refuse_guardrail(identifier: &str, version: Option<&str>) -> ApiError {
    ApiError::NotFound(format!(
        "The guardrail {identifier:?} (version {}) was not found: this router applies no guardrails yet; \
         send the request without a guardrail.",
        version.unwrap_or("DRAFT")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct BlockOn(&'static str);

    impl OutputGuard for BlockOn {
        fn check(&self, _ctx: &Ctx, _so_far: &str, delta: &str) -> OutputVerdict {
            if delta.contains(self.0) { OutputVerdict::Block("[blocked]".into()) } else { OutputVerdict::Pass }
        }
    }

    fn ctx() -> Ctx {
        Ctx {
            request_id: "r".into(),
            tenant: crate::tenants::Tenant::unbounded("t"),
            api: "Converse",
            priority: mantle_admission::Priority::Normal,
            deadline: None,
            received: std::time::Instant::now(),
            cache_salt: String::new(),
            batch: None,
            settled: Default::default(),
        }
    }

    #[test]
    fn a_block_replaces_the_text_drops_tool_calls_and_says_so() {
        let guards = Guards { input: vec![], output: vec![Arc::new(BlockOn("secret"))] };
        assert_eq!(guards.guard(&ctx(), "", "fine".into()), Guarded { text: "fine".into(), blocked: false });
        assert_eq!(guards.guard(&ctx(), "", "a secret".into()), Guarded { text: "[blocked]".into(), blocked: true });
        let mut output = TextOutput {
            text: "the secret is".into(),
            tool_call: None,
            stop_reason: StopReason::EndTurn,
            stop_sequence: None,
            usage: Default::default(),
        };
        guards.guard_reply(&ctx(), &mut output);
        assert_eq!((output.text.as_str(), output.stop_reason), ("[blocked]", StopReason::GuardrailIntervened));
    }
}
