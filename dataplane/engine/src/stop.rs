//! Stop sequences over streamed text: where one matches, and how much text is safe to emit while
//! a tail might still become one. The engine's scheduler and the external-engine runner share them.

/// The earliest stop sequence in `text`: (byte offset, the sequence).
pub fn find_stop(text: &str, stops: &[String]) -> Option<(usize, String)> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()).map(|at| (at, s.clone())))
        .min_by_key(|(at, _)| *at)
}

/// How much of `text` can be emitted: everything except a tail that is a proper prefix of a
/// stop sequence (it might still complete).
pub fn safe_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut keep = text.len();
    for stop in stops {
        for (start, _) in text.char_indices() {
            if start < keep && stop.starts_with(&text[start..]) {
                keep = start;
                break;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_may_begin_a_stop_sequence_is_held_back() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(safe_prefix_len("hello", &stops), 5);
        assert_eq!(safe_prefix_len("hello E", &stops), 6);
        assert_eq!(safe_prefix_len("hello EN", &stops), 6);
        assert_eq!(safe_prefix_len("hello\n", &stops), 5);
        assert_eq!(safe_prefix_len("héllo", &[]), "héllo".len());
        assert_eq!(find_stop("a END b\n\n", &stops), Some((2, "END".into())));
        assert_eq!(find_stop("abc", &stops), None);
    }
}
