//! The AWS wire pieces the Mantle router speaks to boto3 and the AWS SDKs: event-stream framing for
//! streaming responses, and SigV4 verification of signed requests.

pub mod eventstream;
pub mod sigv4;

pub use eventstream::{Decoder, EncodeError, EventStreamError, HeaderValue, Message};
pub use sigv4::{Secret, SigV4Error, VerifiedIdentity};
