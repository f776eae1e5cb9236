//! The Mantle model runner: a gRPC server over the inference engine, one per model replica, with
//! the weight-cache tiers of [`mantle_crds::CacheTier`]. Filled in by the runner issue.

pub use mantle_crds::CacheTier;
