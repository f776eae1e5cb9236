//! Chat templates: the GGUF file's own `tokenizer.chat_template` (Jinja, rendered with
//! minijinja), or a built-in template for a named family when the manifest asks for one.

use minijinja::{Environment, context};
use serde::Serialize;

use crate::EngineError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Built-in template families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateFamily {
    ChatMl,
    Llama3,
    Mistral,
}

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
const LLAMA3: &str = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n\
{{ m.content | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
// Mistral has no system role: a system prompt is prepended to the first user turn.
const MISTRAL: &str = "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}{% if m.role == 'system' %}\
{% set ns.system = m.content + '\n\n' %}{% elif m.role == 'user' %}[INST] {{ ns.system }}{{ m.content }} [/INST]{% set ns.system = '' %}\
{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}";

impl TemplateFamily {
    fn source(self) -> &'static str {
        match self {
            TemplateFamily::ChatMl => CHATML,
            TemplateFamily::Llama3 => LLAMA3,
            TemplateFamily::Mistral => MISTRAL,
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles a Jinja template (a GGUF `tokenizer.chat_template`).
    pub fn from_source(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| EngineError::Template(e.to_string()))?;
        Ok(Self { env, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    pub fn family(family: TemplateFamily, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        Self::from_source(family.source(), bos_token, eos_token)
    }

    /// The prompt text for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let template = self.env.get_template("chat").map_err(|e| EngineError::Template(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| EngineError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
            ChatMessage::new("user", "Capital of France?"),
        ]
    }

    #[test]
    fn chatml_wraps_each_turn_and_opens_the_assistant() {
        let t = ChatTemplate::family(TemplateFamily::ChatMl, "", "<|im_end|>").unwrap();
        assert_eq!(
            t.render(&conversation()).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n\
<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama3_uses_headers_and_eot() {
        let t = ChatTemplate::family(TemplateFamily::Llama3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        assert_eq!(
            t.render(&conversation()[..2]).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn mistral_folds_the_system_prompt_into_the_first_instruction() {
        let t = ChatTemplate::family(TemplateFamily::Mistral, "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&conversation()).unwrap(),
            "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Capital of France? [/INST]"
        );
    }

    #[test]
    fn a_broken_template_is_an_error_not_a_panic() {
        assert!(matches!(ChatTemplate::from_source("{% for %}", "", ""), Err(EngineError::Template(_))));
        let raising = ChatTemplate::from_source("{{ raise_exception('no system role') }}", "", "").unwrap();
        let err = raising.render(&conversation()).unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
    }
}
