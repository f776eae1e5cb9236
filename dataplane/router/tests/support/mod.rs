//! What the router's integration tests share: a FoundationModel from a few fields, and one
//! request through an app with its status, headers and body, and the metering file read back.

#![allow(dead_code)] // each test binary uses its own part

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// A FoundationModel `id` of `modality` (TEXT or EMBEDDING) with a 4,096-token context; `extra`
/// is more YAML under `spec` (each line indented two spaces).
pub fn model(id: &str, modality: &str, extra: &str) -> mantle_crds::FoundationModel {
    let yaml = format!(
        "apiVersion: mantle.dev/v1alpha1\nkind: FoundationModel\nmetadata: {{name: m}}\nspec:\n  modelId: {id}\n  provider: Acme\n  modality: {modality}\n  source: {{uri: 's3://b/m.gguf', format: gguf}}\n  contextLength: 4096\n  pricing: {{inputPer1kTokens: 1.0, outputPer1kTokens: 2.0}}\n{extra}"
    );
    serde_norway::from_str(&yaml).expect("a valid FoundationModel")
}

/// A JSON POST.
pub fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path).header("content-type", "application/json").body(body.into()).expect("a request")
}

/// Sends one request through the app.
pub async fn send(app: &axum::Router, request: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let response = app.clone().oneshot(request).await.expect("the app answers");
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body.collect().await.expect("a whole body").to_bytes())
}

pub fn json_of(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// The metering file's records, once it has at least `least` and a moment has passed for any
/// stray extra one to arrive (or after two seconds).
pub async fn read_metering(path: &std::path::Path, least: usize) -> Vec<serde_json::Value> {
    let read = || -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while read().len() < least && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    read()
}
