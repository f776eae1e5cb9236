//! The Mantle operator: reconciles the `mantle.dev` resources into model-runner pods with
//! weight-cache tiers, ingestion Jobs and batch Jobs.
//!
//! One plan, two executors: [`plan`] (pure) says which runner pools should exist for the
//! FoundationModels, ProvisionedThroughputs and Cells; [`render`] (pure, golden-tested) turns a
//! pool into the objects that realise it; [`controller`] applies them in Kubernetes and writes
//! the [`status`]; `mantle dev` runs the same plan as local processes. Every controller starts
//! from the same gate, [`mantle_crds::Validate`], so a spec the API server let through but that
//! breaks an invariant is reported as a `SpecValid=False` condition instead of being acted on.

pub mod autoscale;
pub mod batch;
pub mod cli;
pub mod controller;
pub mod demand;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod render;
pub mod run;
pub mod runner_args;
pub mod status;

pub use mantle_crds::Validate;
pub use plan::{Desired, Observed, Plan, PoolPlan, plan};
pub use render::{Object, RenderOptions, render};
pub use runner_args::{RunnerPlacement, runner_args};
