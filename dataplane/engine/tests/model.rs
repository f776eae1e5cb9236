//! The engine on the real SmolLM2-135M-Instruct model: it loads from GGUF, tokenizes with the
//! file's own vocabulary, renders the file's chat template and answers real prompts.

use mantle_engine::test_support as support;

use mantle_engine::kv_cache::{BlockTable, KvCache};
use mantle_engine::{ChatMessage, EngineError, GgufFile, Sampler, SamplingParams, Scratch, Step, TextModel};

/// Greedy generation of one sequence, straight on the model (no scheduler).
fn generate(model: &TextModel, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let c = &model.model.config;
    let mut cache = KvCache::new(c.n_layer, c.n_head_kv, c.head_dim, 16, 64);
    let mut table = BlockTable::default();
    let mut scratch = Scratch::default();
    let mut sampler = Sampler::new(SamplingParams::default());
    table.reserve(&mut cache, prompt.len()).unwrap();
    let mut logits = model
        .model
        .forward(
            &[Step { tokens: prompt, start: 0, blocks: table.blocks(), logits: true, all_logits: false }],
            &mut cache,
            &mut scratch,
        )
        .expect("forward");
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let next = sampler.sample(&logits[0]).token;
        if model.tokenizer.is_stop_token(next) {
            break;
        }
        out.push(next);
        let pos = prompt.len() + out.len() - 1;
        table.reserve(&mut cache, pos + 1).unwrap();
        logits = model
            .model
            .forward(
                &[Step { tokens: &[next], start: pos, blocks: table.blocks(), logits: true, all_logits: false }],
                &mut cache,
                &mut scratch,
            )
            .expect("forward");
    }
    out
}

#[test]
fn smollm2_answers_factual_questions() {
    let model = support::smollm2();
    for (question, expected) in [
        ("What is the capital of France? Answer in one sentence.", "Paris"),
        ("Name the largest ocean on Earth.", "Pacific"),
        ("What is 2 + 2?", "4"),
    ] {
        let prompt = model.chat_prompt(&[ChatMessage::new("user", question)]).unwrap();
        let answer = model.tokenizer.decode(&generate(&model, &prompt, 24)).unwrap();
        assert!(answer.contains(expected), "{question} -> {answer:?}");
    }
}

/// Past 256 cached positions attention splits into spans and merges them: the answer after a
/// ~700-token system prompt must still be right.
#[test]
fn a_question_after_a_long_system_prompt_is_answered() {
    let model = support::smollm2();
    let system = "You are a helpful assistant. ".to_string()
        + &"Answer briefly and politely, and keep to facts you are sure of. ".repeat(50);
    let prompt = model
        .chat_prompt(&[
            ChatMessage::new("system", &system),
            ChatMessage::new("user", "What is the capital of France? Answer in one sentence."),
        ])
        .unwrap();
    assert!(prompt.len() > 600, "{} tokens", prompt.len());
    let answer = model.tokenizer.decode(&generate(&model, &prompt, 24)).unwrap();
    assert!(answer.contains("Paris"), "{answer:?}");
}

#[test]
fn tokenizer_round_trips_text_and_keeps_special_tokens_whole() {
    let model = support::smollm2();
    let t = &model.tokenizer;
    let text = "Hello, world! 12345 naïve café 🚀";
    assert_eq!(t.decode(&t.encode(text).unwrap()).unwrap(), text);
    let im_start = t.token_id("<|im_start|>").expect("ChatML token in the vocabulary");
    let ids = t.encode("<|im_start|>user\nhi").unwrap();
    assert_eq!(ids[0], im_start);
    assert!(t.is_stop_token(t.token_id("<|im_end|>").unwrap()));
    // Each token's bytes, joined, are the text (characters split across tokens included).
    let bytes: Vec<u8> = t.encode(text).unwrap().iter().flat_map(|&id| t.token_bytes(id).unwrap()).collect();
    assert_eq!(bytes, text.as_bytes());
    assert_eq!(t.token_bytes(t.token_id("<|im_end|>").unwrap()), None);
}

#[test]
fn the_file_template_renders_chatml() {
    let model = support::smollm2();
    let text = model.template.render(&[ChatMessage::new("user", "hi")]).unwrap();
    assert!(text.starts_with("<|im_start|>system\n"), "{text}");
    assert!(text.ends_with("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), "{text}");
}

#[test]
fn a_batch_of_sequences_gives_the_same_logits_as_each_alone() {
    let model = support::smollm2();
    let c = &model.model.config;
    let prompts: Vec<Vec<u32>> = ["The sky is", "One, two, three,", "def fibonacci(n):"]
        .iter()
        .map(|p| model.tokenizer.encode(p).unwrap())
        .collect();
    let mut scratch = Scratch::default();
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            let mut cache = KvCache::new(c.n_layer, c.n_head_kv, c.head_dim, 16, 8);
            let mut table = BlockTable::default();
            table.reserve(&mut cache, p.len()).unwrap();
            model
                .model
                .forward(
                    &[Step { tokens: p, start: 0, blocks: table.blocks(), logits: true, all_logits: false }],
                    &mut cache,
                    &mut scratch,
                )
                .expect("forward")[0]
                .to_vec()
        })
        .collect();
    let mut cache = KvCache::new(c.n_layer, c.n_head_kv, c.head_dim, 16, 8);
    let tables: Vec<BlockTable> = prompts
        .iter()
        .map(|p| {
            let mut t = BlockTable::default();
            t.reserve(&mut cache, p.len()).unwrap();
            t
        })
        .collect();
    let steps: Vec<Step> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| Step { tokens: p, start: 0, blocks: t.blocks(), logits: true, all_logits: false })
        .collect();
    let together = model.model.forward(&steps, &mut cache, &mut scratch).expect("forward");
    for (a, b) in alone.iter().zip(&together) {
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-3, "logits differ by {worst}");
    }
}

#[test]
fn a_truncated_or_corrupt_model_file_is_refused_with_a_reason() {
    let bytes = std::fs::read(support::smollm2_path()).unwrap();
    let dir = std::env::temp_dir().join(format!("mantle-engine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = GgufFile::open(&truncated).err().expect("truncated file refused");
    assert!(matches!(&err, EngineError::InvalidModel(m) if m.contains("truncated")), "{err}");

    let mut corrupt = bytes[..4096].to_vec();
    corrupt[0] = b'X';
    let bad_magic = dir.join("bad-magic.gguf");
    std::fs::write(&bad_magic, &corrupt).unwrap();
    let err = GgufFile::open(&bad_magic).err().expect("bad magic refused");
    assert!(err.to_string().contains("not a GGUF file"), "{err}");

    let header_only = dir.join("header-only.gguf");
    std::fs::write(&header_only, &bytes[..64]).unwrap();
    assert!(matches!(GgufFile::open(&header_only), Err(EngineError::InvalidModel(_))));

    let missing = GgufFile::open(&dir.join("missing.gguf")).err().expect("missing file refused");
    assert!(matches!(missing, EngineError::Io(_)));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn weights_can_be_pinned_in_memory_or_say_why_not() {
    let gguf = GgufFile::open(&support::smollm2_path()).unwrap();
    let size = std::fs::metadata(support::smollm2_path()).unwrap().len();
    match gguf.lock_in_memory() {
        Ok(()) => {
            // The kernel now counts the whole file as locked memory of this process.
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let locked_kb: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmLck:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("VmLck in /proc/self/status");
            assert!(locked_kb * 1024 >= size, "{locked_kb} kB locked, file is {size} bytes");
        }
        // Without CAP_IPC_LOCK and a small memlock limit the lock is refused, with a remedy.
        Err(EngineError::Io(message)) => assert!(message.contains("memlock limit"), "{message}"),
        Err(other) => panic!("unexpected error {other}"),
    }
}
