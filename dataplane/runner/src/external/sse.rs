//! Server-sent events, as OpenAI-compatible servers stream completions: `data:` lines, an event
//! per blank line. The decoder takes the body's chunks as they come (an event may span chunks, a
//! chunk may hold several events) and keeps at most [`MAX_EVENT_BYTES`] of one event: an upstream
//! that never ends an event cannot grow the runner's memory.

/// The most one event may hold (a completion chunk is a few hundred bytes; one with many
/// log-probabilities a few kilobytes).
pub const MAX_EVENT_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event from the upstream is longer than {MAX_EVENT_BYTES} bytes")]
    TooLong,
    #[error("an event from the upstream is not UTF-8")]
    NotUtf8,
}

#[derive(Debug, Default)]
pub struct Decoder {
    /// The line being read.
    line: Vec<u8>,
    /// The `data` lines of the event being read, joined by `\n`.
    data: Vec<u8>,
    has_data: bool,
    /// The last byte was `\r`: a `\n` right after it ends nothing more.
    after_cr: bool,
}

impl Decoder {
    /// Feeds a chunk of the body; returns the data of each event it completes, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<String>, SseError> {
        let mut events = Vec::new();
        for &b in chunk {
            let after_cr = std::mem::replace(&mut self.after_cr, b == b'\r');
            match b {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    if let Some(event) = self.end_line()? {
                        events.push(event);
                    }
                }
                _ => {
                    if self.line.len() + self.data.len() >= MAX_EVENT_BYTES {
                        return Err(SseError::TooLong);
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(events)
    }

    fn end_line(&mut self) -> Result<Option<String>, SseError> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if !std::mem::take(&mut self.has_data) {
                return Ok(None);
            }
            let data = std::mem::take(&mut self.data);
            return String::from_utf8(data).map(Some).map_err(|_| SseError::NotUtf8);
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            // A comment (`: keep-alive`).
            Some(0) => return Ok(None),
            Some(i) => (&line[..i], line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..])),
            None => (&line[..], &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
        // `event`, `id`, `retry` and unknown fields: completions do not use them.
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Result<Vec<String>, SseError> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(d.feed(c)?);
        }
        Ok(out)
    }

    #[test]
    fn events_are_split_on_blank_lines_whatever_the_chunking() {
        let body = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n: keep-alive\n\nevent: x\ndata: [DONE]\n\n";
        let want = vec!["{\"a\":1}".to_string(), "{\"b\":2}".into(), "[DONE]".into()];
        assert_eq!(all(&[body]).unwrap(), want);
        // Byte by byte: the same events.
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(all(&bytes).unwrap(), want);
        // Split inside a \r\n.
        assert_eq!(all(&[b"data: x\r", b"\n\r", b"\n"]).unwrap(), vec!["x".to_string()]);
    }

    #[test]
    fn multi_line_data_is_joined_and_lines_without_a_space_are_kept_whole() {
        assert_eq!(all(&[b"data:a\ndata: b\n\n"]).unwrap(), vec!["a\nb".to_string()]);
        assert_eq!(all(&[b"data\n\n"]).unwrap(), vec![String::new()]);
    }

    #[test]
    fn malformed_input_is_an_error_or_nothing_never_a_panic() {
        // An event that never ends is cut off at the bound.
        let long = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert_eq!(all(&[b"data: ", &long]), Err(SseError::TooLong));
        let mut d = Decoder::default();
        let line = vec![b'y'; 1000];
        let mut failed = false;
        for _ in 0..(MAX_EVENT_BYTES / 1000 + 2) {
            d.feed(b"data: ").unwrap();
            if d.feed(&line).and_then(|_| d.feed(b"\n")).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "many data lines of one event are bounded too");
        assert_eq!(all(&[b"data: \xff\xfe\n\n"]), Err(SseError::NotUtf8));
        // No blank line yet: no event, nothing lost.
        assert_eq!(all(&[b"data: half"]).unwrap(), Vec::<String>::new());
        assert_eq!(all(&[b"\n\n\n:\nretry: 5\nid\n\n"]).unwrap(), Vec::<String>::new());
    }
}
