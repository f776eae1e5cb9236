use super::*;

const AKID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
/// 2015-08-30T12:36:00Z, the AWS SigV4 test suite's request time.
const SUITE_TIME: u64 = 1_440_938_160;
/// 2025-03-01T09:30:15Z, the time of the captured botocore requests.
const BOTOCORE_TIME: u64 = 1_740_821_415;

fn at(unix: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix)
}

fn lookup(akid: &str) -> Option<Secret> {
    (akid == AKID).then(|| Secret::new(SECRET))
}

fn verify_at(request: &Request<'_>, service: &str, now: SystemTime) -> Result<VerifiedIdentity, SigV4Error> {
    verify(request, lookup, service, now, DEFAULT_MAX_SKEW)
}

fn request<'a>(method: &'a str, path: &'a str, query: &'a str, headers: &'a [(&'a str, &'a str)]) -> Request<'a> {
    Request { method, path, query, headers, body: b"" }
}

/// `headers` with every header called `name` (any case) replaced by `value`, or dropped if `None`.
fn with_header<'a>(headers: &[(&'a str, &'a str)], name: &'a str, value: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut out: Vec<_> = headers.iter().filter(|(n, _)| !n.eq_ignore_ascii_case(name)).copied().collect();
    if let Some(value) = value {
        out.push((name, value));
    }
    out
}

/// An Authorization header value from its three parts.
fn authorization(credential: &str, signed_headers: &str, signature: &str) -> String {
    format!("AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders={signed_headers}, Signature={signature}")
}

const SUITE_CREDENTIAL: &str = "AKIDEXAMPLE/20150830/us-east-1/service/aws4_request";
const GET_VANILLA_SIGNATURE: &str = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";

fn borrowed(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
}

// --- The AWS SigV4 test suite (aws-sig-v4-test-suite), region us-east-1, service `service`. ---

const GET_VANILLA_AUTH: &str = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
     SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
const POST_VANILLA_AUTH: &str = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
     SignedHeaders=host;x-amz-date, Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b";

const VANILLA_HEADERS: [(&str, &str); 2] = [("Host", "example.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z")];

fn get_vanilla_headers() -> Vec<(&'static str, &'static str)> {
    let mut headers = VANILLA_HEADERS.to_vec();
    headers.push(("Authorization", GET_VANILLA_AUTH));
    headers
}

#[test]
fn get_vanilla_from_the_aws_test_suite_verifies() {
    let headers = get_vanilla_headers();
    let identity = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME)).unwrap();
    assert_eq!(
        identity,
        VerifiedIdentity {
            access_key_id: AKID.into(),
            region: "us-east-1".into(),
            service: "service".into(),
            signed_at: at(SUITE_TIME),
            payload_signed: true,
            security_token: None,
        }
    );
}

#[test]
fn post_vanilla_from_the_aws_test_suite_verifies() {
    let mut headers = VANILLA_HEADERS.to_vec();
    headers.push(("Authorization", POST_VANILLA_AUTH));
    assert!(verify_at(&request("POST", "/", "", &headers), "service", at(SUITE_TIME)).is_ok());
}

#[test]
fn sign_reproduces_the_test_suite_signatures() {
    let secret = Secret::new(SECRET);
    for (method, expected) in [("GET", GET_VANILLA_AUTH), ("POST", POST_VANILLA_AUTH)] {
        let signed = sign(&request(method, "/", "", &VANILLA_HEADERS), AKID, &secret, "us-east-1", "service").unwrap();
        assert_eq!(signed, expected, "{method}");
    }
}

#[test]
fn get_vanilla_query_order_key_case_verifies() {
    let mut headers = VANILLA_HEADERS.to_vec();
    headers.push((
        "Authorization",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
         SignedHeaders=host;x-amz-date, Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
    ));
    let req = request("GET", "/", "Param2=value2&Param1=value1", &headers);
    assert!(verify_at(&req, "service", at(SUITE_TIME)).is_ok());
}

#[test]
fn get_header_value_trim_verifies() {
    let headers = [
        ("Host", "example.amazonaws.com"),
        ("My-Header1", " value1"),
        ("My-Header2", " \"a   b   c\""),
        ("X-Amz-Date", "20150830T123600Z"),
        (
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;my-header1;my-header2;x-amz-date, \
             Signature=acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
        ),
    ];
    assert!(verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME)).is_ok());
}

// --- Requests captured from a botocore 1.43 client (service `bedrock`, region us-west-2). ---

const CONVERSE_PATH: &str = "/model/huggingfacetb.smollm2-135m-instruct-v1%3A0/converse";
const CONVERSE_BODY: &[u8] = br#"{"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}"#;
const USER_AGENT: &str = "Botocore/1.43.11 ua/2.1 os/linux#6.18.44-fc-v669 md/arch#x86_64 lang/python#3.11.7 \
                          md/pyimpl#CPython m/e,N,Z,b,D cfg/retry-mode#legacy";
const CONVERSE_HEADERS: [(&str, &str); 8] = [
    ("host", "127.0.0.1:8080"),
    ("Content-Type", "application/json"),
    ("User-Agent", USER_AGENT),
    ("X-Amz-Date", "20250301T093015Z"),
    (
        "Authorization",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250301/us-west-2/bedrock/aws4_request, \
         SignedHeaders=content-type;host;x-amz-date, \
         Signature=87e607132676f1a3a83ac6a4306ded75023e6d8eb6ceb49deaeae7a9cac63071",
    ),
    ("amz-sdk-invocation-id", "c1328091-7b0a-4216-b006-c77c7079cd83"),
    ("amz-sdk-request", "attempt=1"),
    ("Content-Length", "61"),
];

fn converse_request<'a>(headers: &'a [(&'a str, &'a str)]) -> Request<'a> {
    Request { method: "POST", path: CONVERSE_PATH, query: "", headers, body: CONVERSE_BODY }
}

#[test]
fn botocore_converse_with_percent_encoded_model_id_verifies() {
    let identity = verify_at(&converse_request(&CONVERSE_HEADERS), "bedrock", at(BOTOCORE_TIME)).unwrap();
    assert_eq!(identity.access_key_id, AKID);
    assert_eq!(identity.region, "us-west-2");
    assert_eq!(identity.service, "bedrock");
    assert!(identity.payload_signed);
}

#[test]
fn converse_path_decoded_once_no_longer_verifies() {
    // Proof that the canonical URI is the double-encoded wire path: the same request routed by its
    // decoded path fails.
    let mut req = converse_request(&CONVERSE_HEADERS);
    req.path = "/model/huggingfacetb.smollm2-135m-instruct-v1:0/converse";
    assert_eq!(verify_at(&req, "bedrock", at(BOTOCORE_TIME)), Err(SigV4Error::SignatureMismatch));
}

#[test]
fn botocore_list_foundation_models_with_query_verifies() {
    let headers = [
        ("host", "127.0.0.1:8080"),
        ("User-Agent", USER_AGENT),
        ("X-Amz-Date", "20250301T093015Z"),
        (
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250301/us-west-2/bedrock/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=ed400c595bae77db37d4d8a8a566584aaac473d8b6f95df5750fd411204679ec",
        ),
        ("amz-sdk-invocation-id", "8efee26f-9d63-4bef-b69f-05572bbc85a2"),
        ("amz-sdk-request", "attempt=1"),
    ];
    let req = request("GET", "/foundation-models", "byProvider=meta&byOutputModality=TEXT", &headers);
    assert!(verify_at(&req, "bedrock", at(BOTOCORE_TIME)).is_ok());
    let reordered = request("GET", "/foundation-models", "byOutputModality=TEXT&byProvider=meta", &headers);
    assert!(verify_at(&reordered, "bedrock", at(BOTOCORE_TIME)).is_ok());
    let changed = request("GET", "/foundation-models", "byProvider=meta&byOutputModality=IMAGE", &headers);
    assert_eq!(verify_at(&changed, "bedrock", at(BOTOCORE_TIME)), Err(SigV4Error::SignatureMismatch));
}

#[test]
fn botocore_session_token_is_signed_and_reported() {
    let headers = [
        ("Host", "localhost:8080"),
        ("Content-Type", "application/json"),
        ("X-Amz-Date", "20150830T123600Z"),
        ("X-Amz-Security-Token", "FQoGZXIvYXdzEXAMPLETOKEN"),
        (
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/eu-west-1/bedrock/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, \
             Signature=5602f1dbea2305773aa9b14fc278593c86109bba80e87106521b0c44157cedb5",
        ),
    ];
    let req = Request { method: "POST", path: "/model/m/invoke", query: "", headers: &headers, body: b"{}" };
    let identity = verify_at(&req, "bedrock", at(SUITE_TIME)).unwrap();
    assert_eq!(identity.region, "eu-west-1");
    assert_eq!(identity.security_token.as_deref(), Some("FQoGZXIvYXdzEXAMPLETOKEN"));
}

#[test]
fn sign_agrees_with_botocore_on_the_converse_request() {
    let unsigned = with_header(&CONVERSE_HEADERS, "authorization", None);
    let req = converse_request(&unsigned);
    // botocore signed only content-type, host and x-amz-date; sign() also signs the amz-sdk-* and
    // content-length headers, so compare by verifying rather than by string.
    let authorization = sign(&req, AKID, &Secret::new(SECRET), "us-west-2", "bedrock").unwrap();
    assert!(authorization.contains("SignedHeaders=amz-sdk-invocation-id;amz-sdk-request;content-length;"));
    let signed = with_header(&unsigned, "Authorization", Some(&authorization));
    assert!(verify_at(&converse_request(&signed), "bedrock", at(BOTOCORE_TIME)).is_ok());
}

// --- Tampering. ---

#[test]
fn tampered_body_is_rejected() {
    let mut req = converse_request(&CONVERSE_HEADERS);
    req.body = br#"{"messages": [{"role": "user", "content": [{"text": "Ho"}]}]}"#;
    assert_eq!(verify_at(&req, "bedrock", at(BOTOCORE_TIME)), Err(SigV4Error::SignatureMismatch));
    req.body = b"";
    assert_eq!(verify_at(&req, "bedrock", at(BOTOCORE_TIME)), Err(SigV4Error::SignatureMismatch));
}

#[test]
fn tampered_signed_header_is_rejected() {
    let headers = with_header(&CONVERSE_HEADERS, "content-type", Some("text/plain"));
    assert_eq!(
        verify_at(&converse_request(&headers), "bedrock", at(BOTOCORE_TIME)),
        Err(SigV4Error::SignatureMismatch)
    );
    let headers = with_header(&CONVERSE_HEADERS, "host", Some("evil.example:8080"));
    assert_eq!(
        verify_at(&converse_request(&headers), "bedrock", at(BOTOCORE_TIME)),
        Err(SigV4Error::SignatureMismatch)
    );
}

#[test]
fn repeating_a_signed_header_changes_its_canonical_value() {
    let mut headers = CONVERSE_HEADERS.to_vec();
    headers.push(("content-type", "text/plain"));
    assert_eq!(
        verify_at(&converse_request(&headers), "bedrock", at(BOTOCORE_TIME)),
        Err(SigV4Error::SignatureMismatch)
    );
}

#[test]
fn unsigned_headers_may_change_freely() {
    let headers = with_header(&CONVERSE_HEADERS, "user-agent", Some("curl/8"));
    let headers = with_header(&headers, "amz-sdk-request", Some("attempt=2; max=3"));
    assert!(verify_at(&converse_request(&headers), "bedrock", at(BOTOCORE_TIME)).is_ok());
}

#[test]
fn header_names_match_in_any_case() {
    let headers: Vec<(String, String)> = CONVERSE_HEADERS
        .iter()
        .map(|(n, v)| (if *n == "Authorization" { n.to_string() } else { n.to_ascii_uppercase() }, v.to_string()))
        .collect();
    let headers = borrowed(&headers);
    assert!(verify_at(&converse_request(&headers), "bedrock", at(BOTOCORE_TIME)).is_ok());
}

#[test]
fn tampered_method_path_or_signature_is_rejected() {
    let mut req = converse_request(&CONVERSE_HEADERS);
    req.method = "PUT";
    assert_eq!(verify_at(&req, "bedrock", at(BOTOCORE_TIME)), Err(SigV4Error::SignatureMismatch));
    let mut req = converse_request(&CONVERSE_HEADERS);
    req.path = "/model/huggingfacetb.smollm2-135m-instruct-v1%3A0/converse-stream";
    assert_eq!(verify_at(&req, "bedrock", at(BOTOCORE_TIME)), Err(SigV4Error::SignatureMismatch));

    let flipped = authorization(SUITE_CREDENTIAL, "host;x-amz-date", &GET_VANILLA_SIGNATURE.replace("f31", "f30"));
    let headers = with_header(&get_vanilla_headers(), "authorization", Some(&flipped));
    assert_eq!(
        verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME)),
        Err(SigV4Error::SignatureMismatch)
    );
}

#[test]
fn wrong_secret_is_a_signature_mismatch() {
    let headers = get_vanilla_headers();
    let req = request("GET", "/", "", &headers);
    let result = verify(&req, |_| Some(Secret::new("not-the-secret")), "service", at(SUITE_TIME), DEFAULT_MAX_SKEW);
    assert_eq!(result, Err(SigV4Error::SignatureMismatch));
}

// --- Time. ---

#[test]
fn request_within_five_minutes_either_way_is_accepted() {
    let headers = get_vanilla_headers();
    let req = request("GET", "/", "", &headers);
    for now in [SUITE_TIME - 300, SUITE_TIME, SUITE_TIME + 300] {
        assert!(verify_at(&req, "service", at(now)).is_ok(), "now = {now}");
    }
}

#[test]
fn request_older_than_five_minutes_has_expired() {
    let headers = get_vanilla_headers();
    let result = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME + 301));
    assert_eq!(
        result,
        Err(SigV4Error::SignatureExpired {
            request_time: "20150830T123600Z".into(),
            server_time: "20150830T124101Z".into(),
            max_skew_secs: 300,
        })
    );
    assert_eq!(result.unwrap_err().http_status(), 403);
}

#[test]
fn request_more_than_five_minutes_ahead_is_not_yet_current() {
    let headers = get_vanilla_headers();
    let result = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME - 301));
    assert!(matches!(result, Err(SigV4Error::SignatureNotYetCurrent { max_skew_secs: 300, .. })));
}

#[test]
fn max_skew_is_configurable() {
    let headers = get_vanilla_headers();
    let req = request("GET", "/", "", &headers);
    let skew = Duration::from_secs(3600);
    assert!(verify(&req, lookup, "service", at(SUITE_TIME + 3000), skew).is_ok());
    assert!(verify(&req, lookup, "service", at(SUITE_TIME + 3601), skew).is_err());
}

#[test]
fn clock_before_the_epoch_does_not_panic() {
    let headers = get_vanilla_headers();
    let result = verify_at(&request("GET", "/", "", &headers), "service", UNIX_EPOCH - Duration::from_secs(86_400));
    assert!(matches!(result, Err(SigV4Error::SignatureNotYetCurrent { .. })));
}

#[test]
fn date_header_is_used_when_there_is_no_x_amz_date() {
    let headers = [("Host", "example.amazonaws.com"), ("Date", "Sun, 30 Aug 2015 12:36:00 GMT")];
    let authorization = sign(&request("GET", "/", "", &headers), AKID, &Secret::new(SECRET), "us-east-1", "service");
    let authorization = authorization.unwrap();
    assert!(authorization.contains("SignedHeaders=date;host,"));
    let mut signed = headers.to_vec();
    signed.push(("Authorization", &authorization));
    let identity = verify_at(&request("GET", "/", "", &signed), "service", at(SUITE_TIME)).unwrap();
    assert_eq!(identity.signed_at, at(SUITE_TIME));
}

#[test]
fn request_date_must_be_signed() {
    // x-amz-date takes precedence over date, and it is the one that must be signed.
    let date_signed = authorization(SUITE_CREDENTIAL, "date;host", GET_VANILLA_SIGNATURE);
    let mut headers = with_header(&get_vanilla_headers(), "authorization", Some(&date_signed));
    headers.push(("Date", "Sun, 30 Aug 2015 12:36:00 GMT"));
    let result = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME));
    assert_eq!(result, Err(SigV4Error::HeaderNotSigned("x-amz-date")));
}

#[test]
fn missing_or_malformed_date_is_rejected() {
    let headers = with_header(&get_vanilla_headers(), "x-amz-date", None);
    assert_eq!(verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME)), Err(SigV4Error::MissingDate));
    let headers = with_header(&get_vanilla_headers(), "x-amz-date", Some("2015-08-30T12:36:00Z"));
    let result = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME));
    assert!(matches!(result, Err(SigV4Error::MalformedDate { header: "x-amz-date", .. })));
    let mut headers = get_vanilla_headers();
    headers.push(("x-amz-date", "20150830T123600Z"));
    let result = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME));
    assert!(matches!(result, Err(SigV4Error::Malformed(_))));
}

#[test]
fn credential_date_must_be_the_request_date() {
    let day_before =
        authorization("AKIDEXAMPLE/20150829/us-east-1/service/aws4_request", "host;x-amz-date", GET_VANILLA_SIGNATURE);
    let headers = with_header(&get_vanilla_headers(), "authorization", Some(&day_before));
    let result = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME));
    assert_eq!(
        result,
        Err(SigV4Error::WrongScopeDate { scope_date: "20150829".into(), request_date: "20150830".into() })
    );
}

// --- Scope, keys and required headers. ---

#[test]
fn wrong_service_is_rejected() {
    let headers = get_vanilla_headers();
    let result = verify_at(&request("GET", "/", "", &headers), "bedrock", at(SUITE_TIME));
    assert_eq!(result, Err(SigV4Error::WrongService { expected: "bedrock".into(), got: "service".into() }));
    assert_eq!(result.unwrap_err().error_code(), "InvalidSignatureException");
}

#[test]
fn unknown_access_key_is_rejected() {
    let headers = get_vanilla_headers();
    let result = verify(&request("GET", "/", "", &headers), |_| None, "service", at(SUITE_TIME), DEFAULT_MAX_SKEW);
    assert_eq!(result, Err(SigV4Error::UnknownAccessKey(AKID.into())));
    assert_eq!(result.unwrap_err().error_code(), "UnrecognizedClientException");
}

#[test]
fn lookup_receives_the_access_key_id() {
    let headers = get_vanilla_headers();
    let mut asked = None;
    let _ = verify(
        &request("GET", "/", "", &headers),
        |akid| {
            asked = Some(akid.to_owned());
            None
        },
        "service",
        at(SUITE_TIME),
        DEFAULT_MAX_SKEW,
    );
    assert_eq!(asked.as_deref(), Some(AKID));
}

#[test]
fn host_must_be_signed() {
    let headers = [
        ("Host", "example.amazonaws.com"),
        ("X-Amz-Date", "20150830T123600Z"),
        (
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ),
    ];
    let result = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME));
    assert_eq!(result, Err(SigV4Error::HeaderNotSigned("host")));
    assert_eq!(result.unwrap_err().http_status(), 400);
}

#[test]
fn signed_header_absent_from_the_request_is_rejected() {
    let headers = with_header(&CONVERSE_HEADERS, "content-type", None);
    let result = verify_at(&converse_request(&headers), "bedrock", at(BOTOCORE_TIME));
    assert_eq!(result, Err(SigV4Error::SignedHeaderMissing("content-type".into())));
}

#[test]
fn unsigned_security_token_is_rejected() {
    let mut headers = get_vanilla_headers();
    headers.push(("X-Amz-Security-Token", "injected"));
    let result = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME));
    assert_eq!(result, Err(SigV4Error::HeaderNotSigned("x-amz-security-token")));
}

#[test]
fn missing_authorization_is_reported_as_such() {
    let result = verify_at(&request("GET", "/", "", &VANILLA_HEADERS), "service", at(SUITE_TIME));
    assert_eq!(result, Err(SigV4Error::MissingAuthorization));
    assert_eq!(result.unwrap_err().error_code(), "MissingAuthenticationTokenException");
}

#[test]
fn two_authorization_headers_are_rejected() {
    let mut headers = get_vanilla_headers();
    headers.push(("authorization", GET_VANILLA_AUTH));
    let result = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME));
    assert!(matches!(result, Err(SigV4Error::Malformed(_))));
}

#[test]
fn bearer_token_is_an_unsupported_algorithm() {
    let headers = with_header(&get_vanilla_headers(), "authorization", Some("Bearer abc"));
    let result = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME));
    assert_eq!(result, Err(SigV4Error::UnsupportedAlgorithm("Bearer".into())));
}

// --- Payload hash header. ---

/// A PUT of `body` to `/`, signed with the given `x-amz-content-sha256`; headers as owned pairs.
fn signed_with_content_sha256(content_sha256: &str, body: &[u8]) -> Vec<(String, String)> {
    let mut headers = VANILLA_HEADERS.to_vec();
    headers.push(("x-amz-content-sha256", content_sha256));
    let req = Request { method: "PUT", path: "/", query: "", headers: &headers, body };
    let authorization = sign(&req, AKID, &Secret::new(SECRET), "us-east-1", "service").unwrap();
    headers.push(("Authorization", &authorization));
    headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

#[test]
fn unsigned_payload_is_accepted_and_flagged() {
    let headers = signed_with_content_sha256(UNSIGNED_PAYLOAD, b"anything");
    let headers = borrowed(&headers);
    let req = Request { method: "PUT", path: "/", query: "", headers: &headers, body: b"something else" };
    let identity = verify_at(&req, "service", at(SUITE_TIME)).unwrap();
    assert!(!identity.payload_signed);
}

#[test]
fn content_sha256_header_must_match_the_body() {
    let body_hash = "0f5a1d5b6ebb4c2c6b0ba0e2c9a6e8b0ec0d3b6ed4c8d8e6c8b5a8e6a4b2c3d1"; // not sha256("hello")
    let headers = signed_with_content_sha256(body_hash, b"hello");
    let headers = borrowed(&headers);
    let req = Request { method: "PUT", path: "/", query: "", headers: &headers, body: b"hello" };
    assert_eq!(verify_at(&req, "service", at(SUITE_TIME)), Err(SigV4Error::PayloadHashMismatch));

    let hello_hash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    let headers = signed_with_content_sha256(hello_hash, b"hello");
    let headers = borrowed(&headers);
    let req = Request { method: "PUT", path: "/", query: "", headers: &headers, body: b"hello" };
    assert!(verify_at(&req, "service", at(SUITE_TIME)).unwrap().payload_signed);
}

#[test]
fn streaming_payload_hashes_are_not_supported() {
    let headers = signed_with_content_sha256("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", b"");
    let headers = borrowed(&headers);
    let req = request("PUT", "/", "", &headers);
    assert_eq!(
        verify_at(&req, "service", at(SUITE_TIME)),
        Err(SigV4Error::UnsupportedPayloadHash("STREAMING-AWS4-HMAC-SHA256-PAYLOAD".into()))
    );
}

// --- Parsing the Authorization header. ---

#[test]
fn authorization_header_parses_into_its_parts() {
    let auth = parse_authorization(GET_VANILLA_AUTH).unwrap();
    assert_eq!(
        auth.credential,
        Credential {
            access_key_id: AKID.into(),
            date: "20150830".into(),
            region: "us-east-1".into(),
            service: "service".into(),
        }
    );
    assert_eq!(auth.signed_headers, ["host", "x-amz-date"]);
    assert_eq!(hex(&auth.signature), "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31");
}

#[test]
fn authorization_parts_may_come_in_any_order_without_spaces() {
    let reordered = "AWS4-HMAC-SHA256 Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31,\
                     SignedHeaders=host;x-amz-date,Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request";
    assert_eq!(parse_authorization(reordered), parse_authorization(GET_VANILLA_AUTH));
}

#[test]
fn malformed_authorization_headers_are_rejected_without_panicking() {
    let (cred, sig) = (SUITE_CREDENTIAL, GET_VANILLA_SIGNATURE);
    let mut cases: Vec<String> = [
        "",
        " ",
        "AWS4-HMAC-SHA256",
        "AWS4-HMAC-SHA256 ",
        "AWS4-HMAC-SHA1 Credential=a",
        "aws4-hmac-sha256 Credential=a",
        "AWS4-HMAC-SHA256 Credential",
        "AWS4-HMAC-SHA256 Credential=",
        "AWS4-HMAC-SHA256 ,,,",
        "AWS4-HMAC-SHA256 =,=,=",
        "AWS4-HMAC-SHA256 Credential=é/é/é/é/é, SignedHeaders=é, Signature=é",
        "AWS4-HMAC-SHA256\u{0}Credential=x",
    ]
    .map(String::from)
    .into();
    cases.extend([
        format!("AWS4-HMAC-SHA256 SignedHeaders=host, Signature={sig}"),
        format!("AWS4-HMAC-SHA256 Credential={cred}, Signature={sig}"),
        format!("AWS4-HMAC-SHA256 Credential={cred}, SignedHeaders=host"),
        format!("AWS4-HMAC-SHA256 Credential={cred}, Credential={cred}, SignedHeaders=host, Signature={sig}"),
        format!("{}, Extra=1", authorization(cred, "host", sig)),
        format!("AWS4-HMAC-SHA256 {}", "x=".repeat(10_000)),
    ]);
    // Bad SignedHeaders.
    for signed_headers in ["", "host;;x-amz-date", "host; x-amz-date", ";", "host\u{7}"] {
        cases.push(authorization(cred, signed_headers, sig));
    }
    // Bad signatures: short, long, not hex, multi-byte characters.
    for signature in [&sig[..63], &format!("{sig}0"), &format!("{}g", &sig[..63]), &format!("{}é", &sig[..62])] {
        cases.push(authorization(cred, "host", signature));
    }
    cases.push(authorization(cred, "host", &"é".repeat(32)));
    // Bad credential scopes.
    for credential in [
        "AKIDEXAMPLE/20150830/us-east-1/service",
        &format!("{cred}/extra"),
        "/20150830/us-east-1/service/aws4_request",
        "AKID/2015083/us-east-1/service/aws4_request",
        "AKID/2015083é/us-east-1/service/aws4_request",
        "AKID/20150830//service/aws4_request",
        "AKID/20150830/us-east-1//aws4_request",
        "AKID/20150830/us-east-1/service/aws4_requesT",
        "AKID",
        "",
    ] {
        cases.push(authorization(credential, "host", sig));
    }
    for case in &cases {
        let result = parse_authorization(case);
        assert!(
            matches!(result, Err(SigV4Error::Malformed(_) | SigV4Error::UnsupportedAlgorithm(_))),
            "{case:?} gave {result:?}"
        );
        let message = result.unwrap_err().to_string();
        assert!(message.len() < 300, "error message for {case:?} echoes too much: {message}");
    }
}

#[test]
fn malformed_authorization_fails_verification_without_panicking() {
    let bad = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request";
    let headers = with_header(&get_vanilla_headers(), "authorization", Some(bad));
    let result = verify_at(&request("GET", "/", "", &headers), "service", at(SUITE_TIME));
    assert!(matches!(result, Err(SigV4Error::Malformed(_))));
    assert_eq!(result.unwrap_err().error_code(), "IncompleteSignatureException");
}

/// Deterministic xorshift64* so the random test is reproducible without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_mutations_of_a_signed_request_never_panic_and_never_verify() {
    const ALPHABET: &[char] = &['A', 'a', '0', '/', ',', ';', '=', ' ', '%', 'é', '\u{0}', '-', '_', '.', '~', '?'];
    let mut rng = XorShift(0x5eed);
    let auth: Vec<char> = GET_VANILLA_AUTH.chars().collect();
    let mut accepted = 0;
    for _ in 0..5_000 {
        let mut mutated = auth.clone();
        for _ in 0..=(rng.next() % 4) {
            let at = (rng.next() as usize) % mutated.len();
            let ch = ALPHABET[(rng.next() as usize) % ALPHABET.len()];
            match rng.next() % 3 {
                0 => mutated[at] = ch,
                1 => mutated.insert(at, ch),
                _ => {
                    mutated.remove(at);
                }
            }
        }
        let mutated: String = mutated.into_iter().collect();
        let headers = with_header(&get_vanilla_headers(), "authorization", Some(&mutated));
        let path: String = (0..(rng.next() % 6)).map(|_| ALPHABET[(rng.next() as usize) % ALPHABET.len()]).collect();
        for (path, query) in [("/", ""), (path.as_str(), path.as_str())] {
            if verify_at(&request("GET", path, query, &headers), "service", at(SUITE_TIME)).is_ok() {
                // Only a mutation that changes nothing signed may verify: same parsed header, and a
                // path and query that canonicalise to the signed `/` and empty query.
                assert_eq!(parse_authorization(&mutated), parse_authorization(GET_VANILLA_AUTH), "{mutated:?}");
                assert_eq!(
                    (canonical::canonical_uri(path).as_str(), canonical::canonical_query(query).as_str()),
                    ("/", "")
                );
                accepted += 1;
            }
        }
    }
    assert!(accepted > 0, "the unmutated path variant should sometimes survive a harmless mutation");
}

// --- Checking the headers before the body is read. ---

#[test]
fn precheck_accepts_a_known_key_in_its_window_without_the_body() {
    let headers = get_vanilla_headers();
    let req = request("GET", "/", "", &headers);
    let checked = precheck(&req, |akid| akid == AKID, "service", at(SUITE_TIME), DEFAULT_MAX_SKEW).unwrap();
    assert_eq!(checked, Precheck { access_key_id: AKID.into(), payload_signed: true });
}

#[test]
fn precheck_refuses_unknown_keys_stale_dates_and_missing_auth() {
    let headers = get_vanilla_headers();
    let req = request("GET", "/", "", &headers);
    let unknown = precheck(&req, |_| false, "service", at(SUITE_TIME), DEFAULT_MAX_SKEW).unwrap_err();
    assert_eq!(unknown.error_code(), "UnrecognizedClientException");
    let late = precheck(&req, |_| true, "service", at(SUITE_TIME + 3600), DEFAULT_MAX_SKEW).unwrap_err();
    assert!(matches!(late, SigV4Error::SignatureExpired { .. }), "{late:?}");
    let wrong_service = precheck(&req, |_| true, "bedrock", at(SUITE_TIME), DEFAULT_MAX_SKEW).unwrap_err();
    assert_eq!(wrong_service.error_code(), "InvalidSignatureException");
    let none = request("GET", "/", "", &VANILLA_HEADERS);
    let missing = precheck(&none, |_| true, "service", at(SUITE_TIME), DEFAULT_MAX_SKEW).unwrap_err();
    assert_eq!(missing.error_code(), "MissingAuthenticationTokenException");
}

#[test]
fn precheck_flags_an_unsigned_payload() {
    let headers = signed_with_content_sha256(UNSIGNED_PAYLOAD, b"anything");
    let headers = borrowed(&headers);
    let req = Request { method: "PUT", path: "/", query: "", headers: &headers, body: b"" };
    let checked = precheck(&req, |_| true, "service", at(SUITE_TIME), DEFAULT_MAX_SKEW).unwrap();
    assert!(!checked.payload_signed);
}
