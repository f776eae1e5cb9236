//! The Mantle model runner: one model replica behind the `mantle.runner.v1` gRPC API, with
//! Prometheus metrics and health endpoints over HTTP.

pub mod cli;
pub mod engine_loop;
pub mod external;
pub mod gpu;
pub mod health;
pub mod http;
pub mod metrics;
pub mod server;
pub mod service;
#[cfg(feature = "test-support")]
pub mod test_support;
pub mod weights;

pub use server::{RunnerConfig, RunningRunner, ServerError, start};
