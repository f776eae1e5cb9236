//! The Mantle router: the Bedrock- and OpenAI-compatible inference API in front of the model
//! runners — admission, fair queuing, placement, guardrail hooks and metering. Filled in by the
//! router issue; it serves the models described by [`mantle_crds::FoundationModel`].

pub use mantle_crds::FoundationModel;
