//! Mantle's inference engine: llama-family GGUF models with quantized CPU kernels, a paged KV
//! cache and continuous batching; the tokenizer and chat template come from the model file.

pub mod attention;
pub mod chat;
pub mod constraint;
pub mod embedding;
pub mod gguf;
pub mod kv_cache;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod scheduler;
pub mod stop;
pub mod tensor_model;
#[cfg(feature = "test-support")]
pub mod test_support;
pub mod tokenizer;
pub mod vmath;

use std::path::Path;

pub use chat::{ChatMessage, ChatTemplate, TemplateFamily};
pub use constraint::{Constraint, Grammar, Grammars};
pub use embedding::{EmbeddingModel, Embeddings};
pub use gguf::GgufFile;
pub use model::{Backend, LlamaConfig, LlamaModel, Logits, Scratch, Step};
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use scheduler::{Event, FinishReason, GenerateRequest, Scheduler, SchedulerConfig, SchedulerStats, Usage};
pub use tokenizer::{IncrementalDecoder, Tokenizer};

/// Everything that can go wrong in the engine, with a message a caller can show.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Io(String),
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("unsupported tokenizer: {0}")]
    UnsupportedTokenizer(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("grammar: {0}")]
    Grammar(String),
    #[error("device: {0}")]
    Device(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt_tokens} tokens; the model's context is {context_length}")]
    PromptTooLong { prompt_tokens: usize, context_length: usize },
    #[error(
        "max tokens {max_tokens} is invalid: it must be between 1 and {available} (context {context_length} minus {prompt_tokens} prompt tokens)"
    )]
    InvalidMaxTokens { max_tokens: usize, available: usize, prompt_tokens: usize, context_length: usize },
}

/// A text model ready to run: weights, tokenizer and chat template.
pub struct TextModel {
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// The grammar compiler, built on the first constrained request.
    grammars: std::sync::OnceLock<Result<Grammars, EngineError>>,
}

/// A model file's chat template, with its BOS and EOS text: the file's own unless `family` names
/// one (meant for files without a template; it replaces the file's).
pub fn chat_template(
    gguf: &GgufFile,
    tokenizer: &Tokenizer,
    family: Option<TemplateFamily>,
) -> Result<ChatTemplate, EngineError> {
    let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.decode_special(i)).unwrap_or_default();
    let (bos, eos) = (token_text(tokenizer.bos()), token_text(Some(tokenizer.eos())));
    match (family, gguf.string("tokenizer.chat_template")) {
        (Some(f), own) => {
            if own.is_ok() {
                tracing::warn!(
                    family = ?f,
                    "the chat template named in the FoundationModel replaces the one in the model file; \
                     leave chatTemplate unset to use the file's own"
                );
            }
            ChatTemplate::family(f, &bos, &eos)
        }
        (None, Ok(source)) => ChatTemplate::from_source(source, &bos, &eos),
        (None, Err(_)) => Err(EngineError::Template(
            "the model file has no chat template; name a template family in the FoundationModel".into(),
        )),
    }
}

impl TextModel {
    /// Loads a GGUF file. The file's own chat template is used unless `family` names one (meant
    /// for files without a template; it replaces the file's); `threads` sizes the compute pool
    /// (0: one thread per core).
    pub fn load(path: &Path, family: Option<TemplateFamily>, threads: usize) -> Result<Self, EngineError> {
        Self::from_gguf(&GgufFile::open(path)?, family, threads, &Backend::Cpu)
    }

    /// [`load`](Self::load), running the model on `backend`.
    pub fn load_on(
        path: &Path,
        family: Option<TemplateFamily>,
        threads: usize,
        backend: &Backend,
    ) -> Result<Self, EngineError> {
        Self::from_gguf(&GgufFile::open(path)?, family, threads, backend)
    }

    pub fn from_gguf(
        gguf: &GgufFile,
        family: Option<TemplateFamily>,
        threads: usize,
        backend: &Backend,
    ) -> Result<Self, EngineError> {
        let model = LlamaModel::load_on(gguf, threads, backend)?;
        let tokenizer = Tokenizer::from_gguf(gguf)?;
        let template = chat_template(gguf, &tokenizer, family)?;
        Ok(Self { model, tokenizer, template, grammars: std::sync::OnceLock::new() })
    }

    /// Compiles a grammar for this model's vocabulary (the first call builds the token trie).
    pub fn compile_grammar(&self, grammar: &Grammar) -> Result<Constraint, EngineError> {
        let grammars = self.grammars.get_or_init(|| Grammars::new(&self.tokenizer, self.model.config.vocab));
        grammars.as_ref().map_err(Clone::clone)?.compile(grammar)
    }

    /// Prompt token ids for a conversation, through the chat template.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        self.tokenizer.encode(&self.template.render(messages)?)
    }
}
