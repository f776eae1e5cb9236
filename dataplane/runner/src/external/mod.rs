//! The external engine (`serve --engine external`, in progress): the runner's gRPC API over an
//! OpenAI-compatible upstream (vLLM, SGLang, llama.cpp's server, Ollama). What is here so far is
//! the pure part: the request and stream-chunk mapping ([`openai`]) and the server-sent-events
//! decoder ([`sse`]). `testdata/` holds captured `/metrics` texts for the load mapping.

pub mod openai;
pub mod sse;

/// Which server the upstream is, as far as the runner adapts to it (extra request fields, where
/// its load and token counts are read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    Vllm,
    Sglang,
    LlamaCpp,
    /// Any other OpenAI-compatible server: standard fields only.
    #[default]
    Generic,
}
