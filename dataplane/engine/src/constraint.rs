//! Grammar-constrained decoding with llguidance (the library llama.cpp and vLLM use): a JSON
//! schema, a regular expression or a Lark grammar becomes a token mask at every sampling step,
//! so the reply is guaranteed to match — even from a model too small to follow a schema on its
//! own.
//!
//! One [`Grammars`] per model holds the token trie built from the model's own vocabulary (built
//! once, on first use); [`Grammars::compile`] turns a request's grammar into a per-sequence
//! [`Constraint`]. The scheduler asks each constrained sequence for its mask while the forward
//! pass runs, samples among the allowed tokens only, and commits the chosen token; a grammar that
//! is complete (nothing more may follow) ends the sequence like a stop token.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::EngineError;
use crate::tokenizer::Tokenizer;

/// What a reply must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON Schema (draft 2020-12 and earlier, local `$ref`s included). Unless the schema sets
    /// llguidance's own `x-guidance` options, the JSON is compact with `", "` and `": "` between
    /// items: a small model given free whitespace can pad a reply with newlines until
    /// `max_tokens`.
    JsonSchema(Value),
    /// A regular expression (Rust `regex` syntax) the whole reply matches.
    Regex(String),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Value::Object(map) = &mut schema
                    && !map.contains_key("x-guidance")
                {
                    map.insert(
                        "x-guidance".into(),
                        serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
                    );
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// A model's grammar compiler: its vocabulary as llguidance sees it.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// Builds the token trie for `tokenizer`, padded to the `vocab` logits the model produces.
    /// Every stop token counts as an end of sequence, allowed once the grammar may end.
    pub fn new(tokenizer: &Tokenizer, vocab: usize) -> Result<Self, EngineError> {
        let mut words = tokenizer.vocabulary_bytes();
        if words.len() > vocab {
            return Err(EngineError::InvalidModel(format!(
                "the tokenizer has {} tokens but the model only {vocab} logits",
                words.len()
            )));
        }
        words.resize(vocab, Vec::new());
        let info = TokRxInfo::new(vocab as u32, tokenizer.eos());
        let trie = TokTrie::from(&info, &words).with_eos_tokens(tokenizer.stop_tokens());
        let env: TokEnv = Arc::new(VocabEnv { trie, tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| EngineError::Grammar(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compiles a grammar into a fresh constraint, or says why it cannot be used.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, EngineError> {
        let parser =
            self.factory.create_parser(grammar.top_level()).map_err(|e| EngineError::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::Grammar(e));
        }
        Ok(Constraint { matcher })
    }
}

/// One sequence's position in its grammar.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("finished", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// The tokens that may come next (a stop token only once the grammar may end).
    pub fn mask(&mut self) -> Result<SimpleVob, EngineError> {
        self.matcher.compute_mask().map_err(|e| EngineError::Grammar(e.to_string()))
    }

    /// Advances past a sampled token.
    pub fn commit(&mut self, token: u32) -> Result<(), EngineError> {
        self.matcher.consume_token(token).map_err(|e| EngineError::Grammar(e.to_string()))
    }

    /// Whether the grammar is complete and nothing more may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// The vocabulary and the model's own tokenizer, as llguidance asks for them.
struct VocabEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // The model's tokenizer for the UTF-8 part; a trailing partial character (forced bytes
        // can end mid-character) is tokenized greedily by the trie.
        let valid = match std::str::from_utf8(s) {
            Ok(_) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        let text = std::str::from_utf8(&s[..valid]).unwrap_or_default();
        let mut ids = self.tokenizer.encode_plain(text).unwrap_or_else(|_| self.trie.greedy_tokenize(&s[..valid]));
        ids.extend(self.trie.greedy_tokenize(&s[valid..]));
        ids
    }
}
