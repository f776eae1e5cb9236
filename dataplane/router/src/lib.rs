//! The Mantle router: the Bedrock- and OpenAI-compatible inference API in front of the model
//! runners — authentication, admission and fair queuing, placement, guardrail hooks, metering.

pub mod adapters;
pub mod api;
pub mod auth;
pub mod batch;
pub mod catalog;
pub mod error;
pub mod guard;
pub mod inference;
pub mod kubernetes;
pub mod listener;
pub mod metering;
pub mod metrics;
pub mod placement;
pub mod runners;
pub mod server;
pub mod tenants;
#[cfg(feature = "test-support")]
pub mod test_support;

pub use api::Limits;
pub use catalog::{Catalog, ModelEntry};
pub use error::ApiError;
pub use listener::{ConnectionLimits, TlsFiles};
pub use runners::RunnerSpec;
pub use server::{AuthConfig, Platform, RouterConfig, RunningRouter, build, build_apps, start};
