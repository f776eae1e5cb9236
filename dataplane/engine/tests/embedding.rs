//! Embeddings with the real all-MiniLM-L6-v2: unit vectors of 384 dimensions whose cosine
//! similarity ranks paraphrases above unrelated sentences.

use mantle_engine::test_support as support;
use mantle_engine::{EmbeddingModel, EngineError};

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn paraphrases_are_closer_than_unrelated_sentences() {
    let model = EmbeddingModel::load(&support::minilm_dir()).unwrap();
    assert_eq!(model.dimensions(), 384);
    assert_eq!(model.max_tokens(), 256);
    let texts: Vec<String> = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
        "How do I reset my password?",
        "I forgot my password and need to change it.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = model.embed(&texts).unwrap();
    assert_eq!(out.vectors.len(), 5);
    for v in &out.vectors {
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "unit length, got {norm}");
    }
    let e = &out.vectors;
    assert!(cosine(&e[0], &e[1]) > 0.5, "{}", cosine(&e[0], &e[1]));
    assert!(cosine(&e[0], &e[1]) > cosine(&e[0], &e[2]) + 0.3);
    assert!(cosine(&e[3], &e[4]) > cosine(&e[3], &e[2]) + 0.3);
    assert!(out.input_tokens > 5 * 3);
}

#[test]
fn padding_does_not_change_an_embedding() {
    let model = EmbeddingModel::load(&support::minilm_dir()).unwrap();
    let alone = model.embed(&["A short one.".to_string()]).unwrap().vectors.remove(0);
    let batched = model
        .embed(&[
            "A short one.".to_string(),
            "A much longer sentence that forces the first one to be padded quite a bit.".to_string(),
        ])
        .unwrap()
        .vectors
        .remove(0);
    let worst = alone.iter().zip(&batched).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "padding changed the vector by {worst}");
}

#[test]
fn long_texts_are_truncated_and_empty_ones_refused() {
    let model = EmbeddingModel::load(&support::minilm_dir()).unwrap();
    let long = "word ".repeat(2000);
    assert_eq!(model.count_tokens(&long).unwrap(), 256);
    assert_eq!(model.embed(&[long]).unwrap().vectors[0].len(), 384);
    assert!(
        matches!(model.embed(&["ok".into(), String::new()]), Err(EngineError::Tokenizer(m)) if m.contains("text 1"))
    );
    let missing = EmbeddingModel::load(std::path::Path::new("/nonexistent")).err().expect("no model there");
    assert!(matches!(missing, EngineError::Io(_)), "{missing}");
}
