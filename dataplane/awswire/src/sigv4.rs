//! Server-side verification of AWS Signature Version 4 (`AWS4-HMAC-SHA256` in the `Authorization`
//! header), as boto3 and the AWS SDKs sign Bedrock requests.
//!
//! [`verify`] rebuilds the canonical request from the request as received (see `canonical`), derives the
//! signing key from the secret [`verify`]'s caller looks up for the access key id, and compares signatures
//! in constant time. Before any cryptography it checks what a replay or a misdirected request would get
//! wrong: `host` and the request date are signed, the date is within `max_skew` of now, and the credential
//! scope names this service and the request's own date. [`sign`] is the same computation from the
//! client's side, for tests and load generators. Presigned URLs (query-string auth) are not supported.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

mod canonical;
#[cfg(test)]
mod tests;
mod time;

/// The only signing algorithm accepted.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The skew AWS allows between the request date and the server clock.
pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(5 * 60);
/// The `x-amz-content-sha256` value of a request whose body is not covered by the signature.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

const TERMINATOR: &str = "aws4_request";
/// Headers botocore never signs (auth.py `SIGNED_HEADERS_BLACKLIST`), plus the signature itself.
const UNSIGNED_HEADERS: [&str; 12] = [
    "authorization",
    "connection",
    "expect",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "x-amzn-trace-id",
];

/// A borrowed view of a received HTTP request: everything the signature covers.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The path exactly as on the wire, still percent-encoded, without the query.
    pub path: &'a str,
    /// The raw query string after `?`, empty when there is none.
    pub query: &'a str,
    /// Header names (any case) and values in arrival order; a repeated header appears once per value.
    /// Over HTTP/2 the caller supplies `host` from the `:authority` pseudo-header.
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    fn header_values(&self, name: &str) -> impl Iterator<Item = &'a str> {
        let headers = self.headers;
        headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }

    /// The value of a header that may appear at most once.
    fn single_header(&self, name: &'static str) -> Result<Option<&'a str>, SigV4Error> {
        let mut values = self.header_values(name);
        let first = values.next();
        match values.next() {
            Some(_) => Err(SigV4Error::Malformed(format!("the {name} header appears more than once"))),
            None => Ok(first),
        }
    }
}

/// A secret access key. Its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret_access_key: impl Into<String>) -> Self {
        Secret(secret_access_key.into())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The `Credential=` part of an Authorization header: `AKID/YYYYMMDD/region/service/aws4_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub access_key_id: String,
    /// `YYYYMMDD`, eight ASCII digits.
    pub date: String,
    pub region: String,
    pub service: String,
}

impl Credential {
    /// `YYYYMMDD/region/service/aws4_request`.
    fn scope(&self) -> String {
        format!("{}/{}/{}/{TERMINATOR}", self.date, self.region, self.service)
    }
}

/// A parsed `Authorization: AWS4-HMAC-SHA256 ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub credential: Credential,
    /// Header names as listed in `SignedHeaders=`, lower case.
    pub signed_headers: Vec<String>,
    pub signature: [u8; 32],
}

impl Authorization {
    fn signs(&self, name: &str) -> bool {
        self.signed_headers.iter().any(|h| h == name)
    }
}

/// Who signed a request that [`verify`] accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    pub access_key_id: String,
    /// The region the client signed for (its configured region).
    pub region: String,
    pub service: String,
    /// The signed request date.
    pub signed_at: SystemTime,
    /// False when the client sent `x-amz-content-sha256: UNSIGNED-PAYLOAD`: the body is then not
    /// authenticated.
    pub payload_signed: bool,
    /// The signed `x-amz-security-token`, sent with temporary credentials; checking it is the caller's job.
    pub security_token: Option<String>,
}

/// Why a request's signature was not accepted. Messages say what to fix; none contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    #[error("request is not signed: no Authorization header (sign it with SigV4, service `bedrock`)")]
    MissingAuthorization,
    #[error("unsupported authorization scheme `{0}`: only AWS4-HMAC-SHA256 (SigV4) is accepted")]
    UnsupportedAlgorithm(String),
    #[error("malformed SigV4 signature: {0}")]
    Malformed(String),
    #[error("request has no X-Amz-Date (or Date) header; SigV4 needs the signing time")]
    MissingDate,
    #[error("{header} header `{value}` is not a valid date (expected {expected})")]
    MalformedDate { header: &'static str, value: String, expected: &'static str },
    #[error("the {0} header must be included in SignedHeaders")]
    HeaderNotSigned(&'static str),
    #[error("SignedHeaders lists `{0}` but the request has no such header")]
    SignedHeaderMissing(String),
    #[error("credential should be scoped to service `{expected}`, not `{got}`")]
    WrongService { expected: String, got: String },
    #[error("credential should be scoped to the request date {request_date}, not {scope_date}")]
    WrongScopeDate { scope_date: String, request_date: String },
    #[error(
        "signature expired: {request_time} is more than {max_skew_secs}s before the server time \
         {server_time}; check the client clock"
    )]
    SignatureExpired { request_time: String, server_time: String, max_skew_secs: u64 },
    #[error(
        "signature not yet current: {request_time} is more than {max_skew_secs}s after the server time \
         {server_time}; check the client clock"
    )]
    SignatureNotYetCurrent { request_time: String, server_time: String, max_skew_secs: u64 },
    #[error("the access key id `{0}` is not known to this server")]
    UnknownAccessKey(String),
    #[error("x-amz-content-sha256 `{0}` is not supported: send the hex SHA-256 of the body or UNSIGNED-PAYLOAD")]
    UnsupportedPayloadHash(String),
    #[error("the body does not match its x-amz-content-sha256 header")]
    PayloadHashMismatch,
    #[error(
        "the request signature does not match: check the secret access key, and that the request is not \
         changed after signing"
    )]
    SignatureMismatch,
}

impl SigV4Error {
    /// The error code AWS answers with (`x-amzn-ErrorType`).
    pub fn error_code(&self) -> &'static str {
        match self {
            SigV4Error::MissingAuthorization => "MissingAuthenticationTokenException",
            SigV4Error::UnsupportedAlgorithm(_)
            | SigV4Error::Malformed(_)
            | SigV4Error::MissingDate
            | SigV4Error::MalformedDate { .. }
            | SigV4Error::HeaderNotSigned(_)
            | SigV4Error::SignedHeaderMissing(_)
            | SigV4Error::UnsupportedPayloadHash(_) => "IncompleteSignatureException",
            SigV4Error::UnknownAccessKey(_) => "UnrecognizedClientException",
            SigV4Error::WrongService { .. }
            | SigV4Error::WrongScopeDate { .. }
            | SigV4Error::SignatureExpired { .. }
            | SigV4Error::SignatureNotYetCurrent { .. }
            | SigV4Error::PayloadHashMismatch
            | SigV4Error::SignatureMismatch => "InvalidSignatureException",
        }
    }

    /// The HTTP status AWS answers with: 400 for a signature that is incomplete, 403 otherwise.
    pub fn http_status(&self) -> u16 {
        match self.error_code() {
            "IncompleteSignatureException" => 400,
            _ => 403,
        }
    }
}

/// Parses an `Authorization` header value:
/// `AWS4-HMAC-SHA256 Credential=AKID/20150830/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date,
/// Signature=<64 hex digits>`. The three parts may come in any order, each exactly once.
pub fn parse_authorization(value: &str) -> Result<Authorization, SigV4Error> {
    let value = value.trim();
    let (algorithm, params) = value.split_once(|c: char| c.is_ascii_whitespace()).unwrap_or((value, ""));
    if algorithm != ALGORITHM {
        return Err(SigV4Error::UnsupportedAlgorithm(algorithm.chars().take(40).collect()));
    }
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in params.split(',').map(str::trim) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(malformed(format!("expected key=value, found `{}`", shorten(part))));
        };
        let slot = match key {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => return Err(malformed(format!("unknown Authorization component `{}`", shorten(key)))),
        };
        if slot.replace(value).is_some() {
            return Err(malformed(format!("{key} is given more than once")));
        }
    }
    let missing = |what| malformed(format!("Authorization header has no {what}="));
    Ok(Authorization {
        credential: parse_credential(credential.ok_or_else(|| missing("Credential"))?)?,
        signed_headers: parse_signed_headers(signed_headers.ok_or_else(|| missing("SignedHeaders"))?)?,
        signature: parse_signature(signature.ok_or_else(|| missing("Signature"))?)?,
    })
}

fn parse_credential(value: &str) -> Result<Credential, SigV4Error> {
    let parts: Vec<&str> = value.split('/').collect();
    let [access_key_id, date, region, service, terminator] = parts[..] else {
        return Err(malformed(format!(
            "Credential `{}` should be AKID/YYYYMMDD/region/service/aws4_request",
            shorten(value)
        )));
    };
    if access_key_id.is_empty() || region.is_empty() || service.is_empty() {
        return Err(malformed("Credential has an empty access key id, region or service".to_owned()));
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(format!("Credential date `{}` should be YYYYMMDD", shorten(date))));
    }
    if terminator != TERMINATOR {
        return Err(malformed(format!("Credential should end in {TERMINATOR}, not `{}`", shorten(terminator))));
    }
    Ok(Credential {
        access_key_id: access_key_id.to_owned(),
        date: date.to_owned(),
        region: region.to_owned(),
        service: service.to_owned(),
    })
}

fn parse_signed_headers(value: &str) -> Result<Vec<String>, SigV4Error> {
    let names: Vec<String> = value.split(';').map(str::to_ascii_lowercase).collect();
    if names.iter().any(|n| n.is_empty() || n.contains(|c: char| c.is_whitespace() || c.is_control())) {
        return Err(malformed(format!("SignedHeaders `{}` is not a ;-separated list of names", shorten(value))));
    }
    Ok(names)
}

fn parse_signature(value: &str) -> Result<[u8; 32], SigV4Error> {
    let bytes = value.as_bytes();
    let mut signature = [0u8; 32];
    if bytes.len() != 64 {
        return Err(malformed(format!("Signature should be 64 hex digits, got {} characters", value.chars().count())));
    }
    for (byte, pair) in signature.iter_mut().zip(bytes.chunks_exact(2)) {
        let digit = |b: u8| char::from(b).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => *byte = (hi << 4 | lo) as u8,
            _ => return Err(malformed("Signature should be 64 hex digits".to_owned())),
        }
    }
    Ok(signature)
}

fn malformed(message: String) -> SigV4Error {
    SigV4Error::Malformed(message)
}

/// At most 64 characters of untrusted input, for error messages.
fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

/// What the headers alone say about a SigV4-signed request, checked before its body is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Precheck {
    pub access_key_id: String,
    /// False when the client sent `x-amz-content-sha256: UNSIGNED-PAYLOAD`.
    pub payload_signed: bool,
}

/// Checks everything about a SigV4-signed request that does not need its body: the Authorization
/// header parses, `host` and the date are signed, the credential scope names `expected_service` and
/// the request date, the date is within `max_skew` of `now`, and `knows_key` recognises the access
/// key id. A server calls this before reading a body byte, then [`verify`] once the body is read
/// (the signature covers the body's hash), so an anonymous client cannot make it buffer a body.
pub fn precheck(
    request: &Request<'_>,
    knows_key: impl FnOnce(&str) -> bool,
    expected_service: &str,
    now: SystemTime,
    max_skew: Duration,
) -> Result<Precheck, SigV4Error> {
    let (auth, _) = check_scope(request, expected_service, now, max_skew)?;
    let access_key_id = auth.credential.access_key_id;
    if !knows_key(&access_key_id) {
        return Err(SigV4Error::UnknownAccessKey(shorten(&access_key_id)));
    }
    let payload_signed = request.single_header("x-amz-content-sha256")? != Some(UNSIGNED_PAYLOAD);
    Ok(Precheck { access_key_id, payload_signed })
}

/// The checks of [`precheck`] and [`verify`] that come before the secret: the parsed header and
/// the signing time.
fn check_scope(
    request: &Request<'_>,
    expected_service: &str,
    now: SystemTime,
    max_skew: Duration,
) -> Result<(Authorization, SignedAt), SigV4Error> {
    let header = request.single_header("authorization")?.ok_or(SigV4Error::MissingAuthorization)?;
    let auth = parse_authorization(header)?;
    if !auth.signs("host") {
        return Err(SigV4Error::HeaderNotSigned("host"));
    }
    let signed_at = request_time(request)?;
    if !auth.signs(signed_at.header) {
        return Err(SigV4Error::HeaderNotSigned(signed_at.header));
    }
    let credential = &auth.credential;
    if credential.service != expected_service {
        return Err(SigV4Error::WrongService {
            expected: expected_service.to_owned(),
            got: credential.service.clone(),
        });
    }
    if credential.date != signed_at.date() {
        return Err(SigV4Error::WrongScopeDate {
            scope_date: credential.date.clone(),
            request_date: signed_at.date().to_owned(),
        });
    }
    check_skew(signed_at.unix, now, max_skew)?;
    let security_token = request.single_header("x-amz-security-token")?;
    if security_token.is_some() && !auth.signs("x-amz-security-token") {
        return Err(SigV4Error::HeaderNotSigned("x-amz-security-token"));
    }
    Ok((auth, signed_at))
}

/// Verifies a SigV4-signed request.
///
/// `lookup_secret` maps the access key id in the signature to its secret (`None`: unknown key);
/// `expected_service` is the signing name this endpoint answers to (`bedrock`); `now` is the server clock.
pub fn verify(
    request: &Request<'_>,
    lookup_secret: impl FnOnce(&str) -> Option<Secret>,
    expected_service: &str,
    now: SystemTime,
    max_skew: Duration,
) -> Result<VerifiedIdentity, SigV4Error> {
    let (auth, signed_at) = check_scope(request, expected_service, now, max_skew)?;
    let credential = &auth.credential;
    let security_token = request.single_header("x-amz-security-token")?;
    let secret = lookup_secret(&credential.access_key_id)
        .ok_or_else(|| SigV4Error::UnknownAccessKey(shorten(&credential.access_key_id)))?;

    let payload_hash = payload_hash(request)?;
    let payload_signed = check_payload_hash(request, &payload_hash)?;
    let string_to_sign = string_to_sign(request, &auth.signed_headers, &payload_hash, &signed_at.amz_date, credential)?;
    let mut mac = signing_mac(&secret, credential);
    mac.update(string_to_sign.as_bytes());
    mac.verify_slice(&auth.signature).map_err(|_| SigV4Error::SignatureMismatch)?;

    Ok(VerifiedIdentity {
        access_key_id: credential.access_key_id.clone(),
        region: credential.region.clone(),
        service: credential.service.clone(),
        signed_at: system_time(signed_at.unix),
        payload_signed,
        security_token: security_token.map(str::to_owned),
    })
}

/// Signs `request` as botocore would and returns the `Authorization` header value. The request must
/// already carry `host` and `x-amz-date` (or `date`); every header except the ones botocore leaves out
/// (`user-agent`, hop-by-hop headers, `x-amzn-trace-id`) is signed. Like botocore, an
/// `x-amz-content-sha256` header is signed as the payload hash without being checked against the body.
pub fn sign(
    request: &Request<'_>,
    access_key_id: &str,
    secret: &Secret,
    region: &str,
    service: &str,
) -> Result<String, SigV4Error> {
    let signed_at = request_time(request)?;
    let mut signed_headers: Vec<String> = request
        .headers
        .iter()
        .map(|(name, _)| name.to_ascii_lowercase())
        .filter(|name| !UNSIGNED_HEADERS.contains(&name.as_str()))
        .collect();
    signed_headers.sort();
    signed_headers.dedup();
    if !signed_headers.iter().any(|h| h == "host") {
        return Err(SigV4Error::SignedHeaderMissing("host".to_owned()));
    }
    let credential = Credential {
        access_key_id: access_key_id.to_owned(),
        date: signed_at.date().to_owned(),
        region: region.to_owned(),
        service: service.to_owned(),
    };
    let payload_hash = payload_hash(request)?;
    let string_to_sign = string_to_sign(request, &signed_headers, &payload_hash, &signed_at.amz_date, &credential)?;
    let mut mac = signing_mac(secret, &credential);
    mac.update(string_to_sign.as_bytes());
    Ok(format!(
        "{ALGORITHM} Credential={access_key_id}/{}, SignedHeaders={}, Signature={}",
        credential.scope(),
        signed_headers.join(";"),
        hex(&mac.finalize().into_bytes())
    ))
}

/// `time` as an `X-Amz-Date` value (`20150830T123600Z`).
pub fn amz_date(time: SystemTime) -> String {
    time::format_amz_date(time::unix_seconds(time))
}

/// When the request says it was signed, and which header said so.
struct SignedAt {
    header: &'static str,
    unix: i64,
    /// `YYYYMMDDTHHMMSSZ`, as it goes into the string to sign.
    amz_date: String,
}

impl SignedAt {
    /// `YYYYMMDD`, the date the credential scope must name.
    fn date(&self) -> &str {
        // amz_date is our own ASCII formatting of a four-digit-year date.
        self.amz_date.get(..8).unwrap_or_default()
    }
}

/// `x-amz-date` if present, else `date` (the SigV4 rule).
fn request_time(request: &Request<'_>) -> Result<SignedAt, SigV4Error> {
    let (header, value, parsed, expected) = if let Some(value) = request.single_header("x-amz-date")? {
        ("x-amz-date", value, time::parse_amz_date(value), "YYYYMMDDTHHMMSSZ")
    } else if let Some(value) = request.single_header("date")? {
        ("date", value, time::parse_http_date(value), "an IMF-fixdate such as `Sun, 30 Aug 2015 12:36:00 GMT`")
    } else {
        return Err(SigV4Error::MissingDate);
    };
    let unix = parsed.ok_or_else(|| SigV4Error::MalformedDate { header, value: shorten(value), expected })?;
    Ok(SignedAt { header, unix, amz_date: time::format_amz_date(unix) })
}

fn check_skew(signed_at: i64, now: SystemTime, max_skew: Duration) -> Result<(), SigV4Error> {
    let now = time::unix_seconds(now);
    let max_skew_secs = max_skew.as_secs();
    let skew = i128::from(signed_at) - i128::from(now);
    if skew.unsigned_abs() <= u128::from(max_skew_secs) {
        return Ok(());
    }
    let request_time = time::format_amz_date(signed_at);
    let server_time = time::format_amz_date(now);
    Err(if skew < 0 {
        SigV4Error::SignatureExpired { request_time, server_time, max_skew_secs }
    } else {
        SigV4Error::SignatureNotYetCurrent { request_time, server_time, max_skew_secs }
    })
}

fn system_time(unix: i64) -> SystemTime {
    let magnitude = Duration::from_secs(unix.unsigned_abs());
    let shifted = if unix >= 0 { UNIX_EPOCH.checked_add(magnitude) } else { UNIX_EPOCH.checked_sub(magnitude) };
    shifted.unwrap_or(UNIX_EPOCH)
}

/// The payload hash line as the client computed it: `x-amz-content-sha256` when sent, otherwise the hex
/// SHA-256 of the body.
fn payload_hash(request: &Request<'_>) -> Result<String, SigV4Error> {
    Ok(match request.single_header("x-amz-content-sha256")? {
        Some(claimed) => claimed.to_owned(),
        None => hex(&Sha256::digest(request.body)),
    })
}

/// A signed `x-amz-content-sha256` vouches for the body only if the body matches it; returns whether the
/// body is covered by the signature.
fn check_payload_hash(request: &Request<'_>, payload_hash: &str) -> Result<bool, SigV4Error> {
    if payload_hash == UNSIGNED_PAYLOAD {
        return Ok(false);
    }
    if payload_hash.len() != 64 || !payload_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SigV4Error::UnsupportedPayloadHash(shorten(payload_hash)));
    }
    if !payload_hash.eq_ignore_ascii_case(&hex(&Sha256::digest(request.body))) {
        return Err(SigV4Error::PayloadHashMismatch);
    }
    Ok(true)
}

fn string_to_sign(
    request: &Request<'_>,
    signed_headers: &[String],
    payload_hash: &str,
    amz_date: &str,
    credential: &Credential,
) -> Result<String, SigV4Error> {
    let mut canonical = String::with_capacity(512);
    canonical.push_str(&request.method.to_ascii_uppercase());
    canonical.push('\n');
    canonical.push_str(&canonical::canonical_uri(request.path));
    canonical.push('\n');
    canonical.push_str(&canonical::canonical_query(request.query));
    canonical.push('\n');
    for name in signed_headers {
        let mut values = request.header_values(name).peekable();
        if values.peek().is_none() {
            return Err(SigV4Error::SignedHeaderMissing(shorten(name)));
        }
        canonical.push_str(name);
        canonical.push(':');
        canonical.push_str(&canonical::canonical_header_value(values));
        canonical.push('\n');
    }
    canonical.push('\n');
    canonical.push_str(&signed_headers.join(";"));
    canonical.push('\n');
    canonical.push_str(payload_hash);
    Ok(format!("{ALGORITHM}\n{amz_date}\n{}\n{}", credential.scope(), hex(&Sha256::digest(canonical.as_bytes()))))
}

/// HMAC keyed with the signing key `HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service),
/// "aws4_request")`, ready for the string to sign.
fn signing_mac(secret: &Secret, credential: &Credential) -> Hmac<Sha256> {
    let mut key = hmac(format!("AWS4{}", secret.0).as_bytes(), credential.date.as_bytes());
    for part in [credential.region.as_str(), credential.service.as_str(), TERMINATOR] {
        key = hmac(&key, part.as_bytes());
    }
    new_mac(&key)
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = new_mac(key);
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn new_mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length (long ones are hashed), so this cannot fail.
    Hmac::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}
