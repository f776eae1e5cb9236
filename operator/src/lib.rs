//! The Mantle operator: reconciles the `mantle.dev` resources into model-runner pods with
//! weight-cache tiers, ingestion Jobs and batch Jobs.
//!
//! Its controllers arrive with their own issues; every one of them starts from the same gate,
//! [`mantle_crds::Validate`], so a spec the API server let through but that breaks an invariant is
//! reported as a `SpecValid=False` condition instead of being acted on. Pure render functions
//! (what goes into the objects it creates) live beside it and are golden-tested.

pub mod cli;
pub mod plan;
pub mod render;
pub mod runner_args;

pub use mantle_crds::Validate;
pub use plan::{Desired, Observed, Plan, PoolPlan, plan};
pub use render::{Object, RenderOptions, render};
pub use runner_args::{RunnerPlacement, runner_args};
