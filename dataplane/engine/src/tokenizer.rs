//! The tokenizer, built from the GGUF file's own metadata (vocabulary, merges, token types,
//! pre-tokenizer name): nothing is downloaded at run time.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::EngineError;
use crate::gguf::GgufFile;

/// GGUF token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Llama 3's pre-tokenizer pattern.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: u32,
    /// Tokens that end a turn: EOS plus control tokens such as `<|im_end|>` or `<|eot_id|>`.
    stop_tokens: Vec<u32>,
    add_bos: bool,
    vocab: HashMap<String, u32>,
    /// Control and user-defined tokens, which stand for themselves rather than for bytes.
    specials: Vec<bool>,
}

impl Tokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, EngineError> {
        let model = gguf.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(EngineError::UnsupportedTokenizer(format!(
                "tokenizer model {model:?} (this engine builds byte-level BPE tokenizers, GGUF model \"gpt2\")"
            )));
        }
        let pre = gguf.string("tokenizer.ggml.pre").unwrap_or("default");
        let tokens = gguf.strings("tokenizer.ggml.tokens")?;
        let merges = gguf.strings("tokenizer.ggml.merges")?;
        let types = gguf.i32s("tokenizer.ggml.token_type").unwrap_or_default();

        let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| EngineError::InvalidModel(format!("malformed merge {m:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab.iter().map(|(k, v)| (k.clone(), *v)).collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .build()
            .map_err(|e| EngineError::InvalidModel(format!("building the BPE tokenizer: {e}")))?;

        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "default" | "gpt2" | "gpt-2" => ByteLevel::new(false, true, true).into(),
            "smollm" | "starcoder" | "refact" => {
                Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()
            }
            "llama-bpe" | "llama3" => {
                let split =
                    Split::new(SplitPattern::Regex(LLAMA3_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
                        .map_err(|e| EngineError::InvalidModel(format!("pre-tokenizer pattern: {e}")))?;
                Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
            }
            other => {
                return Err(EngineError::UnsupportedTokenizer(format!("pre-tokenizer {other:?}")));
            }
        };
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(tok, _)| AddedToken::from(tok.to_string(), true))
            .collect();
        inner.add_special_tokens(&specials);

        let id = |k: &str| gguf.u32(k).ok().filter(|&i| (i as usize) < tokens.len());
        let eos = id("tokenizer.ggml.eos_token_id").ok_or_else(|| EngineError::InvalidModel("no EOS token".into()))?;
        let mut stop_tokens = vec![eos];
        for name in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>"] {
            if let Some(&i) = vocab.get(name)
                && types.get(i as usize).is_none_or(|&t| t == TOKEN_TYPE_CONTROL)
                && !stop_tokens.contains(&i)
            {
                stop_tokens.push(i);
            }
        }
        if let Some(eot) = id("tokenizer.ggml.eot_token_id").filter(|i| !stop_tokens.contains(i)) {
            stop_tokens.push(eot);
        }
        let add_bos =
            gguf.metadata().get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        let specials = (0..tokens.len())
            .map(|i| types.get(i).is_some_and(|t| matches!(*t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED)))
            .collect();
        Ok(Self { inner, bos: id("tokenizer.ggml.bos_token_id"), eos, stop_tokens, add_bos, vocab, specials })
    }

    /// Token ids of `text`; special-token text such as `<|im_start|>` becomes its one id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Token ids of `text` alone, without a beginning-of-sequence token.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.inner.decode(ids, true).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Every token that ends a turn.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_tokens.contains(&id)
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
}

/// Turns a growing list of token ids into text deltas without splitting UTF-8 characters that
/// span tokens: text is released only once it no longer ends in an incomplete character.
#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl IncrementalDecoder {
    /// Adds a token and returns the new text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, EngineError> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let delta = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(delta)
    }
}

impl Tokenizer {
    /// The text of one token, special or not (`<|im_end|>`), for chat templates.
    pub fn decode_special(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes one generated token adds to the text (a token may hold part of a UTF-8
    /// character), for log-probability reports; `None` for a stop token, which adds nothing.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        if self.is_stop_token(id) {
            return None;
        }
        let piece = self.inner.id_to_token(id)?;
        // A byte-level BPE piece spells each byte as one character; a special token is its text.
        piece.chars().map(byte_of_char).collect::<Option<Vec<u8>>>().or_else(|| Some(piece.into_bytes()))
    }

    /// Every token's bytes in the form grammar engines expect: a normal token is the bytes it
    /// adds to the text; a control or user-defined token (`<|im_end|>`) is its text after a 0xFF
    /// marker byte, which no UTF-8 text contains, so no grammar can spell it by accident.
    pub fn vocabulary_bytes(&self) -> Vec<Vec<u8>> {
        (0..self.specials.len() as u32)
            .map(|id| {
                let piece = self.inner.id_to_token(id).unwrap_or_default();
                if self.specials.get(id as usize).copied().unwrap_or(false) {
                    return [&[0xff], piece.as_bytes()].concat();
                }
                piece.chars().map(byte_of_char).collect::<Option<Vec<u8>>>().unwrap_or_else(|| piece.into_bytes())
            })
            .collect()
    }
}

/// The byte a byte-level BPE character stands for (GPT-2's `bytes_to_unicode`, inverted):
/// printable Latin-1 bytes stand for themselves, the other 68 bytes for U+0100 onwards in order.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let code = c as u32;
    if printable(code) {
        return Some(code as u8);
    }
    let index = code.checked_sub(0x100)?;
    (0u32..=0xff).filter(|&b| !printable(b)).nth(index as usize).map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::byte_of_char;

    #[test]
    fn byte_level_characters_map_back_to_their_bytes() {
        assert_eq!(byte_of_char('a'), Some(b'a'));
        // GPT-2 spells a space Ġ (U+0120) and a newline Ċ (U+010A).
        assert_eq!(byte_of_char('Ġ'), Some(b' '));
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('\u{100}'), Some(0));
        assert_eq!(byte_of_char('\u{143}'), Some(0xad));
        assert_eq!(byte_of_char('\u{144}'), None);
        assert_eq!(byte_of_char('é'), Some(0xe9));
    }
}
