//! Authentication between the router and its runners: a shared token (a Kubernetes Secret, or
//! one `mantle dev` makes) sent as `authorization: Bearer <token>` on every call. Without it a
//! runner's gRPC port would serve anyone who reaches it, skipping tenants, limits and metering.

use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The most bytes a token may have (a file read at start must not be a whole disk).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// A shared secret, redacted in `Debug`.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why a token could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the runner token {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the runner token must be 16 to {MAX_TOKEN_BYTES} printable ASCII characters")]
    Invalid,
}

impl Token {
    /// A token from its text (surrounding whitespace, such as a file's final newline, is
    /// dropped).
    pub fn new(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() < 16 || text.len() > MAX_TOKEN_BYTES || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Invalid);
        }
        Ok(Token(text.into()))
    }

    /// A token from a file (a mounted Secret's key).
    pub fn from_file(path: &std::path::Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenError::Read { path: path.display().to_string(), source })?;
        Token::new(&text)
    }

    fn header(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether `presented` (an `authorization` value) carries this token, compared in constant
    /// time so the comparison does not reveal how much of a guess was right.
    fn admits(&self, presented: &[u8]) -> bool {
        let expected = self.header();
        let expected = expected.as_bytes();
        if presented.len() != expected.len() {
            return false;
        }
        presented.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// The client side: adds the token to every call (none when there is no token).
#[derive(Clone, Debug, Default)]
pub struct SendToken(pub Option<Token>);

impl Interceptor for SendToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value: MetadataValue<_> =
                token.header().parse().map_err(|_| Status::internal("the runner token is not a valid header"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// The server side: refuses calls without the token (every call passes when there is none).
#[derive(Clone, Debug, Default)]
pub struct RequireToken(pub Option<Token>);

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else { return Ok(request) };
        match request.metadata().get("authorization") {
            Some(value) if token.admits(value.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("the runner token is not valid")),
            None => Err(Status::unauthenticated("this runner needs the router's token (authorization: Bearer ...)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_is_admitted() {
        let token = Token::new("s3cret-token-0123456789\n").unwrap();
        let mut require = RequireToken(Some(token.clone()));
        let mut send = SendToken(Some(token));
        let signed = send.call(Request::new(())).unwrap();
        assert!(require.call(signed).is_ok());
        assert_eq!(require.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut wrong = SendToken(Some(Token::new("another-token-0123456789").unwrap()));
        let forged = wrong.call(Request::new(())).unwrap();
        assert_eq!(require.call(forged).unwrap_err().code(), tonic::Code::Unauthenticated);
        // Without a token configured, the runner is open (a trusted network, or tests).
        assert!(RequireToken(None).call(Request::new(())).is_ok());
    }

    #[test]
    fn short_or_unprintable_tokens_are_refused() {
        assert!(Token::new("short").is_err());
        assert!(Token::new("has a space in it, 0123456789").is_err());
        assert!(Token::new(&"x".repeat(MAX_TOKEN_BYTES + 1)).is_err());
        assert!(format!("{:?}", Token::new("s3cret-token-0123456789").unwrap()).contains("redacted"));
    }
}
