//! The runner's gRPC API, `mantle.runner.v1`, generated from `proto/mantle/runner/v1/runner.proto`.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

pub mod auth;
pub mod codec;

pub mod runner {
    pub mod v1 {
        tonic::include_proto!("mantle.runner.v1");
    }
}

pub use runner::v1::*;
