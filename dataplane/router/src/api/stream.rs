//! Streaming response bodies: AWS event streams and server-sent events.
//!
//! A task writes frames into a bounded channel that the HTTP body reads: a slow client fills the
//! channel and the task waits (backpressure reaches the runner's gRPC stream through HTTP/2
//! flow control); a client that goes away closes the channel, the task's next send fails, and
//! dropping the generation cancels the runner's stream. No frame is buffered without bound.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use mantle_awswire::eventstream::Message;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{ApiError, StreamUnion};

/// Frames buffered between the generation and a client.
const FRAMES: usize = 16;

/// The sending side; every method returns `false` once the client is gone.
pub struct Frames {
    tx: mpsc::Sender<Bytes>,
    /// The event stream's output union (None for server-sent events).
    union: Option<StreamUnion>,
}

/// How long a stream waits for a client that has stopped reading before giving up on it.
pub const STALLED_READER: std::time::Duration = std::time::Duration::from_secs(60);

impl Frames {
    /// An event-stream frame with a JSON payload.
    pub async fn event(&self, event_type: &str, payload: &Value) -> bool {
        self.frame(Message::event(event_type, payload.to_string().into_bytes())).await
    }

    /// A modeled exception frame, named by a member of the stream's own union.
    pub async fn exception(&self, error: &ApiError) -> bool {
        let union = self.union.unwrap_or(StreamUnion::ResponseStream);
        let (member, body) = error.stream_exception(union);
        self.frame(Message::exception(member, body.to_string().into_bytes())).await
    }

    async fn frame(&self, message: Message) -> bool {
        match message.encode() {
            Ok(bytes) => self.send(Bytes::from(bytes)).await,
            Err(e) => {
                tracing::error!(error = %e, "an event-stream frame could not be encoded");
                false
            }
        }
    }

    /// One server-sent event: `data: <json>`.
    pub async fn sse(&self, data: &str) -> bool {
        self.send(Bytes::from(format!("data: {data}\n\n"))).await
    }

    /// Queues bytes for the client. A client that stops reading for [`STALLED_READER`] counts as
    /// gone: the caller then drops the generation, which frees its slot and cancels it on the
    /// runner, instead of waiting on a full channel forever.
    async fn send(&self, bytes: Bytes) -> bool {
        match tokio::time::timeout(STALLED_READER, self.tx.send(bytes)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::info!("the client stopped reading the stream; ending it");
                false
            }
        }
    }
}

fn body(rx: mpsc::Receiver<Bytes>) -> Body {
    Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>))
}

/// A 200 event-stream response and the sender that feeds it (chunked, one chunk per frame);
/// `union` is the operation's output union, which names its exceptions.
pub fn event_stream(union: StreamUnion, extra: &[(&'static str, &'static str)]) -> (Frames, Response) {
    let (tx, rx) = mpsc::channel(FRAMES);
    let mut response = Response::new(body(rx));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/vnd.amazon.eventstream"));
    for (name, value) in extra {
        headers.insert(*name, HeaderValue::from_static(value));
    }
    (Frames { tx, union: Some(union) }, response)
}

/// A 200 server-sent-events response and its sender.
pub fn sse() -> (Frames, Response) {
    let (tx, rx) = mpsc::channel(FRAMES);
    let mut response = Response::new(body(rx));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (Frames { tx, union: None }, response)
}
