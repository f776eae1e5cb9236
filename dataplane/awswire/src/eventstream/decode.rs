//! Decoding event-stream frames: a whole frame at a time ([`decode_message`]) or from a byte stream that
//! arrives in arbitrary chunks ([`Decoder`]). Every malformed input is a typed [`EventStreamError`].

use std::collections::HashSet;

use super::{HeaderValue, MAX_HEADERS_LEN, MAX_PAYLOAD_LEN, MIN_FRAME_LEN, Message, PRELUDE_LEN};

/// Why bytes are not a valid event-stream frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventStreamError {
    #[error("event-stream prelude checksum mismatch: frame says {expected:#010x}, bytes give {computed:#010x}")]
    PreludeChecksum { expected: u32, computed: u32 },
    #[error("event-stream message checksum mismatch: frame says {expected:#010x}, bytes give {computed:#010x}")]
    MessageChecksum { expected: u32, computed: u32 },
    #[error("event-stream frame length {total_len} is below the {MIN_FRAME_LEN}-byte minimum")]
    FrameTooShort { total_len: u32 },
    #[error("event-stream headers length {headers_len} does not fit in a {total_len}-byte frame")]
    HeadersExceedFrame { headers_len: u32, total_len: u32 },
    #[error("event-stream headers length {len} exceeds the {MAX_HEADERS_LEN}-byte limit")]
    HeadersTooLong { len: u32 },
    #[error("event-stream payload length {len} exceeds the {MAX_PAYLOAD_LEN}-byte limit")]
    PayloadTooLong { len: u32 },
    #[error("event-stream frame is {actual} bytes but its prelude says {total_len}")]
    FrameLengthMismatch { total_len: u32, actual: usize },
    #[error("event-stream header block ends in the middle of a header")]
    TruncatedHeader,
    #[error("event-stream header name is empty")]
    EmptyHeaderName,
    #[error("event-stream header name is not valid UTF-8")]
    HeaderNameNotUtf8,
    #[error("event-stream header `{name}` has a string value that is not valid UTF-8")]
    HeaderValueNotUtf8 { name: String },
    #[error("event-stream header `{name}` has unknown value type {type_id}")]
    UnknownHeaderType { name: String, type_id: u8 },
    #[error("event-stream header `{name}` appears more than once")]
    DuplicateHeader { name: String },
    #[error("event stream ended inside a frame ({buffered} bytes of it received)")]
    TruncatedStream { buffered: usize },
}

/// Reassembles frames from a byte stream delivered in arbitrary chunks.
///
/// Call [`push`](Decoder::push) with each chunk, then [`next_message`](Decoder::next_message) until it
/// returns `Ok(None)`; at end of stream [`finish`](Decoder::finish) reports a frame cut short. A frame's
/// prelude is checked as soon as its 12 bytes arrive, so a bogus length fails at once instead of
/// buffering up to 4 GiB. An error leaves the bad frame in the buffer: the stream cannot be
/// resynchronised, and later calls return the same error.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the first unconsumed byte in `buf`.
    start: usize,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Buffers the next chunk of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` when more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, EventStreamError> {
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let Some(prelude) = pending.get(..PRELUDE_LEN) else { return Ok(None) };
        let total_len = Prelude::parse(prelude)?.total_len as usize;
        let Some(frame) = pending.get(..total_len) else { return Ok(None) };
        let message = decode_message(frame)?;
        self.start += total_len;
        Ok(Some(message))
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Ends the stream: an error if it stopped partway through a frame.
    pub fn finish(self) -> Result<(), EventStreamError> {
        match self.buffered_len() {
            0 => Ok(()),
            buffered => Err(EventStreamError::TruncatedStream { buffered }),
        }
    }
}

/// Decodes exactly one frame; `frame` must hold the whole frame and nothing more.
pub fn decode_message(frame: &[u8]) -> Result<Message, EventStreamError> {
    let prelude_bytes = frame.get(..PRELUDE_LEN).ok_or(EventStreamError::FrameLengthMismatch {
        total_len: read_u32(frame, 0).unwrap_or(0),
        actual: frame.len(),
    })?;
    let prelude = Prelude::parse(prelude_bytes)?;
    let total_len = prelude.total_len as usize;
    if frame.len() != total_len {
        return Err(EventStreamError::FrameLengthMismatch { total_len: prelude.total_len, actual: frame.len() });
    }
    let crc_at = total_len - 4;
    let expected = read_u32(frame, crc_at).unwrap_or_default();
    let computed = crc32fast::hash(&frame[..crc_at]);
    if expected != computed {
        return Err(EventStreamError::MessageChecksum { expected, computed });
    }
    let headers_end = PRELUDE_LEN + prelude.headers_len as usize;
    let headers = parse_headers(&frame[PRELUDE_LEN..headers_end])?;
    Ok(Message { headers, payload: frame[headers_end..crc_at].to_vec() })
}

/// The first 12 bytes of a frame, checksum and lengths validated.
struct Prelude {
    total_len: u32,
    headers_len: u32,
}

impl Prelude {
    /// `bytes` is exactly [`PRELUDE_LEN`] long.
    fn parse(bytes: &[u8]) -> Result<Self, EventStreamError> {
        let field = |at| read_u32(bytes, at).ok_or(EventStreamError::TruncatedStream { buffered: bytes.len() });
        let (total_len, headers_len, expected) = (field(0)?, field(4)?, field(8)?);
        let computed = crc32fast::hash(&bytes[..8]);
        if expected != computed {
            return Err(EventStreamError::PreludeChecksum { expected, computed });
        }
        if (total_len as usize) < MIN_FRAME_LEN {
            return Err(EventStreamError::FrameTooShort { total_len });
        }
        let Some(payload_len) = total_len.checked_sub(MIN_FRAME_LEN as u32).and_then(|n| n.checked_sub(headers_len))
        else {
            return Err(EventStreamError::HeadersExceedFrame { headers_len, total_len });
        };
        if headers_len as usize > MAX_HEADERS_LEN {
            return Err(EventStreamError::HeadersTooLong { len: headers_len });
        }
        if payload_len as usize > MAX_PAYLOAD_LEN {
            return Err(EventStreamError::PayloadTooLong { len: payload_len });
        }
        Ok(Prelude { total_len, headers_len })
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(word.try_into().ok()?))
}

fn parse_headers(block: &[u8]) -> Result<Vec<(String, HeaderValue)>, EventStreamError> {
    let mut cursor = Cursor(block);
    let mut headers: Vec<(String, HeaderValue)> = Vec::new();
    let mut seen = HashSet::new();
    while !cursor.0.is_empty() {
        let name_len = usize::from(cursor.array::<1>()?[0]);
        if name_len == 0 {
            return Err(EventStreamError::EmptyHeaderName);
        }
        let name = std::str::from_utf8(cursor.take(name_len)?).map_err(|_| EventStreamError::HeaderNameNotUtf8)?;
        let value = match cursor.array::<1>()?[0] {
            0 => HeaderValue::Bool(true),
            1 => HeaderValue::Bool(false),
            2 => HeaderValue::Byte(i8::from_be_bytes(cursor.array()?)),
            3 => HeaderValue::Int16(i16::from_be_bytes(cursor.array()?)),
            4 => HeaderValue::Int32(i32::from_be_bytes(cursor.array()?)),
            5 => HeaderValue::Int64(i64::from_be_bytes(cursor.array()?)),
            6 => HeaderValue::Bytes(cursor.u16_prefixed()?.to_vec()),
            7 => match std::str::from_utf8(cursor.u16_prefixed()?) {
                Ok(s) => HeaderValue::String(s.to_owned()),
                Err(_) => return Err(EventStreamError::HeaderValueNotUtf8 { name: name.to_owned() }),
            },
            8 => HeaderValue::Timestamp(i64::from_be_bytes(cursor.array()?)),
            9 => HeaderValue::Uuid(cursor.array()?),
            type_id => return Err(EventStreamError::UnknownHeaderType { name: name.to_owned(), type_id }),
        };
        if !seen.insert(name) {
            return Err(EventStreamError::DuplicateHeader { name: name.to_owned() });
        }
        headers.push((name.to_owned(), value));
    }
    Ok(headers)
}

/// Reads a header block front to back; running out of bytes is [`EventStreamError::TruncatedHeader`].
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EventStreamError> {
        let (head, rest) = self.0.split_at_checked(n).ok_or(EventStreamError::TruncatedHeader)?;
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], EventStreamError> {
        self.take(N)?.try_into().map_err(|_| EventStreamError::TruncatedHeader)
    }

    fn u16_prefixed(&mut self) -> Result<&'a [u8], EventStreamError> {
        let len = u16::from_be_bytes(self.array()?);
        self.take(usize::from(len))
    }
}
