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
