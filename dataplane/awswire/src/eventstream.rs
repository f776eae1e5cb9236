//! AWS event-stream framing (`application/vnd.amazon.eventstream`): the binary frames in which Bedrock's
//! streaming operations (ConverseStream, InvokeModelWithResponseStream) send one message per event.
//!
//! A frame, all integers big-endian, both checksums CRC-32/IEEE (the zlib one, not CRC32C):
//!
//! ```text
//! [total_len u32][headers_len u32][prelude_crc u32 = crc32(bytes[0..8])]
//! [headers: { name_len u8 | name utf8 | type u8 | value }*]
//! [payload]                                   payload_len = total_len - headers_len - 16
//! [message_crc u32 = crc32(bytes[0..total_len-4])]
//! ```
//!
//! The encoder refuses what the decoder refuses (over-long names and values, duplicate header names,
//! headers over 128 KiB, payloads over 24 MiB), so every frame [`Message::encode`] writes decodes again.
//!
//! Why not `aws-smithy-eventstream` (0.61, evaluated 2026-12-04): its frames are byte-identical to
//! these (checked against this module's test vectors), but its encoder has no header or payload
//! limits, so it would write frames botocore refuses, and it accepts duplicate and empty header
//! names; its decoder buffers whatever length a prelude announces (up to 4 GiB), checks the
//! prelude CRC only once the whole frame has arrived, resets after an error instead of failing the
//! stream, and exposes no error kinds. It also needs Rust 1.94 and ten crates this workspace does
//! not otherwise build. For about 400 lines saved it would weaken what this module guarantees, so
//! the framing stays here.

use std::collections::HashSet;

mod decode;
#[cfg(test)]
mod tests;

pub use decode::{Decoder, EventStreamError, decode_message};

/// Bytes before the headers: total length, headers length, prelude CRC.
pub const PRELUDE_LEN: usize = 12;
/// Prelude plus the trailing message CRC: the size of a frame with no headers and no payload.
pub const MIN_FRAME_LEN: usize = PRELUDE_LEN + 4;
/// Largest header block a frame may carry (botocore's limit).
pub const MAX_HEADERS_LEN: usize = 128 * 1024;
/// Largest payload a frame may carry (botocore's limit).
pub const MAX_PAYLOAD_LEN: usize = 24 * 1024 * 1024;

const CONTENT_TYPE_JSON: &str = "application/json";

/// A typed header value; the wire type byte is given by [`HeaderValue::type_id`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Bool(bool),
    Byte(i8),
    Int16(i16),
    Int32(i32),
    Int64(i64),
    /// At most `u16::MAX` bytes.
    Bytes(Vec<u8>),
    /// At most `u16::MAX` bytes of UTF-8.
    String(String),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
    Uuid([u8; 16]),
}

impl HeaderValue {
    /// The wire type byte: 0 true, 1 false, 2 i8, 3 i16, 4 i32, 5 i64, 6 bytes, 7 string, 8 timestamp, 9 uuid.
    pub fn type_id(&self) -> u8 {
        match self {
            HeaderValue::Bool(true) => 0,
            HeaderValue::Bool(false) => 1,
            HeaderValue::Byte(_) => 2,
            HeaderValue::Int16(_) => 3,
            HeaderValue::Int32(_) => 4,
            HeaderValue::Int64(_) => 5,
            HeaderValue::Bytes(_) => 6,
            HeaderValue::String(_) => 7,
            HeaderValue::Timestamp(_) => 8,
            HeaderValue::Uuid(_) => 9,
        }
    }

    /// The value when it is a string header (all the headers Bedrock sends are).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Bytes of a variable-length value, which must fit the u16 length prefix.
    fn variable_len(&self) -> Option<usize> {
        match self {
            HeaderValue::Bytes(b) => Some(b.len()),
            HeaderValue::String(s) => Some(s.len()),
            _ => None,
        }
    }

    /// Encoded size: the type byte plus the value.
    fn encoded_len(&self) -> usize {
        1 + match self {
            HeaderValue::Bool(_) => 0,
            HeaderValue::Byte(_) => 1,
            HeaderValue::Int16(_) => 2,
            HeaderValue::Int32(_) => 4,
            HeaderValue::Int64(_) | HeaderValue::Timestamp(_) => 8,
            HeaderValue::Bytes(b) => 2 + b.len(),
            HeaderValue::String(s) => 2 + s.len(),
            HeaderValue::Uuid(_) => 16,
        }
    }

    /// Writes the type byte and value; lengths were checked by [`Message::validate`].
    fn write(&self, out: &mut Vec<u8>) {
        out.push(self.type_id());
        match self {
            HeaderValue::Bool(_) => {}
            HeaderValue::Byte(v) => out.extend_from_slice(&v.to_be_bytes()),
            HeaderValue::Int16(v) => out.extend_from_slice(&v.to_be_bytes()),
            HeaderValue::Int32(v) => out.extend_from_slice(&v.to_be_bytes()),
            HeaderValue::Int64(v) | HeaderValue::Timestamp(v) => out.extend_from_slice(&v.to_be_bytes()),
            HeaderValue::Bytes(b) => write_u16_prefixed(out, b),
            HeaderValue::String(s) => write_u16_prefixed(out, s.as_bytes()),
            HeaderValue::Uuid(u) => out.extend_from_slice(u),
        }
    }
}

fn write_u16_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Why a message cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("event-stream header name `{name}` is {len} bytes; names must be 1 to 255 bytes")]
    HeaderNameLength { name: String, len: usize },
    #[error("event-stream header `{name}` has a {len}-byte value; values are limited to 65535 bytes")]
    HeaderValueTooLong { name: String, len: usize },
    #[error("event-stream header `{name}` appears more than once")]
    DuplicateHeader { name: String },
    #[error("event-stream headers take {len} bytes; the limit is {MAX_HEADERS_LEN}")]
    HeadersTooLong { len: usize },
    #[error("event-stream payload is {len} bytes; the limit is {MAX_PAYLOAD_LEN}")]
    PayloadTooLong { len: usize },
}

/// One event-stream message: ordered, uniquely named headers and an opaque payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub headers: Vec<(String, HeaderValue)>,
    pub payload: Vec<u8>,
}

impl Message {
    /// A modeled event: `:event-type`, `:content-type: application/json`, `:message-type: event`.
    pub fn event(event_type: &str, json_payload: Vec<u8>) -> Self {
        Message {
            headers: vec![
                string_header(":event-type", event_type),
                string_header(":content-type", CONTENT_TYPE_JSON),
                string_header(":message-type", "event"),
            ],
            payload: json_payload,
        }
    }

    /// A modeled exception (`exception_type` is the lowerCamel member name, e.g. `throttlingException`):
    /// `:exception-type`, `:content-type: application/json`, `:message-type: exception`.
    pub fn exception(exception_type: &str, json_payload: Vec<u8>) -> Self {
        Message {
            headers: vec![
                string_header(":exception-type", exception_type),
                string_header(":content-type", CONTENT_TYPE_JSON),
                string_header(":message-type", "exception"),
            ],
            payload: json_payload,
        }
    }

    /// An unmodeled error: `:error-code`, `:error-message`, `:message-type: error` and no payload. Both
    /// strings are cut at a character boundary to the 65535 bytes a header value can hold.
    pub fn error(code: &str, message: &str) -> Self {
        Message {
            headers: vec![
                string_header(":error-code", truncate_utf8(code, usize::from(u16::MAX))),
                string_header(":error-message", truncate_utf8(message, usize::from(u16::MAX))),
                string_header(":message-type", "error"),
            ],
            payload: Vec::new(),
        }
    }

    /// The value of the header called `name`, if present.
    pub fn header(&self, name: &str) -> Option<&HeaderValue> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The frame for this message.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the frame for this message to `out`; on error `out` is left as it was.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let headers_len = self.validate()?;
        // Both lengths are bounded by validate(), so the frame length fits in u32 with room to spare.
        let total_len = MIN_FRAME_LEN + headers_len + self.payload.len();
        let start = out.len();
        out.reserve(total_len);
        out.extend_from_slice(&frame_len_u32(total_len).to_be_bytes());
        out.extend_from_slice(&frame_len_u32(headers_len).to_be_bytes());
        let prelude_crc = crc32fast::hash(&out[start..start + 8]);
        out.extend_from_slice(&prelude_crc.to_be_bytes());
        for (name, value) in &self.headers {
            out.push(name.len() as u8); // 1..=255, checked by validate()
            out.extend_from_slice(name.as_bytes());
            value.write(out);
        }
        out.extend_from_slice(&self.payload);
        let message_crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&message_crc.to_be_bytes());
        Ok(())
    }

    /// Checks every limit the decoder enforces; returns the encoded header block length.
    fn validate(&self) -> Result<usize, EncodeError> {
        let mut headers_len = 0usize;
        let mut seen = HashSet::new();
        for (name, value) in &self.headers {
            if name.is_empty() || name.len() > usize::from(u8::MAX) {
                return Err(EncodeError::HeaderNameLength { name: name.clone(), len: name.len() });
            }
            if let Some(len) = value.variable_len().filter(|&len| len > usize::from(u16::MAX)) {
                return Err(EncodeError::HeaderValueTooLong { name: name.clone(), len });
            }
            if !seen.insert(name.as_str()) {
                return Err(EncodeError::DuplicateHeader { name: name.clone() });
            }
            headers_len += 1 + name.len() + value.encoded_len();
        }
        if headers_len > MAX_HEADERS_LEN {
            return Err(EncodeError::HeadersTooLong { len: headers_len });
        }
        if self.payload.len() > MAX_PAYLOAD_LEN {
            return Err(EncodeError::PayloadTooLong { len: self.payload.len() });
        }
        Ok(headers_len)
    }
}

fn string_header(name: &str, value: &str) -> (String, HeaderValue) {
    (name.to_owned(), HeaderValue::String(value.to_owned()))
}

fn frame_len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
