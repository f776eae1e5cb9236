//! The bedrock batch API: CreateModelInvocationJob, GetModelInvocationJob,
//! ListModelInvocationJobs and StopModelInvocationJob, over BatchJob objects (see
//! [`crate::batch`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use k8s_openapi::jiff::Timestamp;
use mantle_crds::{
    BatchInput, BatchJob, BatchJobPhase, BatchJobSpec, BatchOutput, InputFormat, InvocationType, batch_job_arn,
    batch_job_id,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Caller, Shared, require_json};
use crate::adapters::parse_body;
use crate::batch::{
    BatchJobs, CLIENT_TOKEN_ANNOTATION, CREATED_BY_API_ANNOTATION, ROLE_ARN_ANNOTATION, TENANT_ANNOTATION,
};
use crate::error::ApiError;

/// The namespace API-created jobs live in.
const NAMESPACE: &str = "default";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateBody {
    job_name: String,
    role_arn: String,
    #[serde(default)]
    client_request_token: Option<String>,
    model_id: String,
    input_data_config: InputDataConfig,
    output_data_config: OutputDataConfig,
    #[serde(default)]
    vpc_config: Option<Value>,
    #[serde(default)]
    timeout_duration_in_hours: Option<i32>,
    #[serde(default)]
    tags: Option<Vec<Tag>>,
    #[serde(default)]
    model_invocation_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct InputDataConfig {
    s3_input_data_config: S3Input,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct S3Input {
    #[serde(default)]
    s3_input_format: Option<String>,
    s3_uri: String,
    #[serde(default)]
    s3_bucket_owner: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OutputDataConfig {
    s3_output_data_config: S3Output,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct S3Output {
    s3_uri: String,
    #[serde(default)]
    s3_encryption_key_id: Option<String>,
    #[serde(default)]
    s3_bucket_owner: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tag {
    key: String,
    value: String,
}

fn backend(state: &Shared) -> Result<&Arc<dyn BatchJobs>, ApiError> {
    state.batch_jobs.as_ref().ok_or_else(|| {
        ApiError::validation("Batch inference is not enabled on this router (it runs with no batch job store).")
    })
}

/// The BatchJob a CreateModelInvocationJob request asks for.
fn job_of(body: CreateBody, caller: &Caller, state: &Shared) -> Result<BatchJob, ApiError> {
    let name = body.job_name;
    // A Kubernetes object name: Bedrock's job names allow capitals and dots, BatchJobs do not.
    let valid_name = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !valid_name {
        return Err(ApiError::validation(format!(
            "jobName {name:?} must be 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit (it names a BatchJob object)"
        )));
    }
    if body.vpc_config.is_some() {
        return Err(ApiError::validation("vpcConfig is not supported: batch workers run on the cluster's own network"));
    }
    let input = body.input_data_config.s3_input_data_config;
    let output = body.output_data_config.s3_output_data_config;
    if input.s3_bucket_owner.is_some() || output.s3_bucket_owner.is_some() {
        return Err(ApiError::validation(
            "s3BucketOwner is not supported: the job's credentials decide which buckets it may use",
        ));
    }
    if output.s3_encryption_key_id.is_some() {
        return Err(ApiError::validation(
            "s3EncryptionKeyId is not supported: outputs are written with the bucket's default encryption",
        ));
    }
    if let Some(format) = input.s3_input_format.as_deref()
        && format != "JSONL"
    {
        return Err(ApiError::validation(format!("s3InputFormat {format:?} must be JSONL")));
    }
    let invocation_type = match body.model_invocation_type.as_deref() {
        None | Some("InvokeModel") => InvocationType::InvokeModel,
        Some("Converse") => InvocationType::Converse,
        Some(other) => {
            return Err(ApiError::validation(format!("modelInvocationType {other:?} must be InvokeModel or Converse")));
        }
    };
    // The model must be one served here; its catalog id is what the job records.
    let model_id = state.inference.live().catalog.resolve(&body.model_id)?.model_id.clone();
    let spec = BatchJobSpec {
        model_id,
        input: BatchInput { uri: input.s3_uri, format: InputFormat::Jsonl },
        output: BatchOutput { uri: output.s3_uri },
        credentials_secret_ref: None,
        invocation_type,
        inference_config: None,
        tier: Default::default(),
        timeout_duration_in_hours: body.timeout_duration_in_hours.unwrap_or(24),
        sharding: Default::default(),
        input_token_limit: None,
        reuse_from: None,
        output_schema: None,
        partition_key: None,
        stop: false,
        rerun: None,
    };
    let mut job = BatchJob::new(&name, spec);
    job.metadata.namespace = Some(NAMESPACE.into());
    let mut annotations = BTreeMap::from([
        (ROLE_ARN_ANNOTATION.to_string(), body.role_arn),
        (TENANT_ANNOTATION.to_string(), caller.tenant.name.clone()),
        (CREATED_BY_API_ANNOTATION.to_string(), "CreateModelInvocationJob".to_string()),
    ]);
    if let Some(token) = body.client_request_token {
        annotations.insert(CLIENT_TOKEN_ANNOTATION.to_string(), token);
    }
    if let Some(tags) = body.tags {
        let tags: BTreeMap<String, String> = tags.into_iter().map(|t| (t.key, t.value)).collect();
        annotations.insert("mantle.dev/tags".to_string(), serde_json::to_string(&tags).unwrap_or_default());
    }
    job.metadata.annotations = Some(annotations);
    job.validate().map_err(|e| ApiError::validation(e.to_string()))?;
    Ok(job)
}

pub async fn create(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        require_json(&headers, "content-type")?;
        let jobs = backend(&state)?;
        let body: CreateBody = parse_body(&body)?;
        let job = job_of(body, &caller, &state)?;
        let created = jobs.create(job).await?;
        let arn = arn_of(&state, &created);
        tracing::info!(request_id = %caller.request_id, job = %created.metadata.name.as_deref().unwrap_or(""), %arn, "batch job created");
        Ok::<_, ApiError>(axum::Json(json!({ "jobArn": arn })).into_response())
    }
    .await;
    result.unwrap_or_else(ApiError::into_bedrock)
}

fn arn_of(state: &Shared, job: &BatchJob) -> String {
    job.status.as_ref().and_then(|s| s.job_arn.clone()).unwrap_or_else(|| {
        batch_job_arn(
            &state.inference.config.region,
            &batch_job_id(
                job.metadata.namespace.as_deref().unwrap_or(NAMESPACE),
                job.metadata.name.as_deref().unwrap_or(""),
            ),
        )
    })
}

/// Finds a job by ARN, id or name.
async fn find(state: &Shared, identifier: &str) -> Result<BatchJob, ApiError> {
    let jobs = backend(state)?.list().await?;
    let id = identifier.rsplit('/').next().unwrap_or(identifier);
    jobs.into_iter()
        .find(|j| j.job_id() == id || j.metadata.name.as_deref() == Some(identifier))
        .ok_or_else(|| ApiError::NotFound(format!("The model invocation job {identifier} does not exist.")))
}

pub async fn get(
    State(state): State<Shared>,
    Extension(_caller): Extension<Caller>,
    Path(job): Path<String>,
) -> Response {
    match find(&state, &job).await {
        Ok(job) => axum::Json(view(&state, &job)).into_response(),
        Err(e) => e.into_bedrock(),
    }
}

pub async fn stop(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(job): Path<String>,
) -> Response {
    let result = async {
        let job = find(&state, &job).await?;
        let phase = job.status.as_ref().and_then(|s| s.phase);
        if phase.is_some_and(BatchJobPhase::is_terminal) {
            return Err(ApiError::validation(format!(
                "The job is {}; only a job that has not ended can be stopped.",
                phase_name(phase)
            )));
        }
        let name = job.metadata.name.clone().unwrap_or_default();
        backend(&state)?.stop(&name).await?;
        tracing::info!(request_id = %caller.request_id, job = %name, "batch job stop requested");
        Ok::<_, ApiError>(axum::Json(json!({})).into_response())
    }
    .await;
    result.unwrap_or_else(ApiError::into_bedrock)
}

fn phase_name(phase: Option<BatchJobPhase>) -> &'static str {
    match phase {
        None | Some(BatchJobPhase::Submitted) => "Submitted",
        Some(BatchJobPhase::Validating) => "Validating",
        Some(BatchJobPhase::Scheduled) => "Scheduled",
        Some(BatchJobPhase::InProgress) => "InProgress",
        Some(BatchJobPhase::Completed) => "Completed",
        Some(BatchJobPhase::PartiallyCompleted) => "PartiallyCompleted",
        Some(BatchJobPhase::Failed) => "Failed",
        Some(BatchJobPhase::Stopping) => "Stopping",
        Some(BatchJobPhase::Stopped) => "Stopped",
        Some(BatchJobPhase::Expired) => "Expired",
    }
}

/// Bedrock's ISO 8601 form, with milliseconds.
fn time(t: &Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// A job as GetModelInvocationJob (and a ListModelInvocationJobs item) shows it.
fn view(state: &Shared, job: &BatchJob) -> Value {
    let status = job.status.clone().unwrap_or_default();
    let annotations = job.metadata.annotations.clone().unwrap_or_default();
    let submitted = status
        .submit_time
        .as_ref()
        .map(|t| t.0)
        .or(job.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or_else(Timestamp::now);
    let mut v = json!({
        "jobArn": arn_of(state, job),
        "jobName": job.metadata.name,
        "modelId": job.spec.model_id,
        "roleArn": annotations.get(ROLE_ARN_ANNOTATION).cloned().unwrap_or_else(|| "arn:aws:iam::000000000000:role/mantle".into()),
        "status": phase_name(status.phase),
        "submitTime": time(&submitted),
        "inputDataConfig": {"s3InputDataConfig": {"s3InputFormat": "JSONL", "s3Uri": job.spec.input.uri}},
        "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": job.spec.output.uri}},
        "timeoutDurationInHours": job.spec.timeout_duration_in_hours,
        "modelInvocationType": match job.spec.invocation_type { InvocationType::InvokeModel => "InvokeModel", InvocationType::Converse => "Converse" },
        "totalRecordCount": status.records.total,
        "processedRecordCount": status.records.processed,
        "successRecordCount": status.records.success,
        "errorRecordCount": status.records.error,
    });
    let o = v.as_object_mut().expect("an object");
    if let Some(token) = annotations.get(CLIENT_TOKEN_ANNOTATION) {
        o.insert("clientRequestToken".into(), token.clone().into());
    }
    if let Some(message) = status.message {
        o.insert("message".into(), message.into());
    }
    if let Some(end) = status.end_time {
        o.insert("endTime".into(), time(&end.0).into());
        o.insert("lastModifiedTime".into(), time(&end.0).into());
    } else {
        o.insert("lastModifiedTime".into(), time(&Timestamp::now()).into());
    }
    if let Some(expires) = status.job_expiration_time {
        o.insert("jobExpirationTime".into(), time(&expires.0).into());
    }
    v
}

/// ListModelInvocationJobs's query.
#[derive(Default)]
struct ListQuery {
    after: Option<Timestamp>,
    before: Option<Timestamp>,
    status: Option<String>,
    name_contains: Option<String>,
    max_results: usize,
    next: usize,
    descending: bool,
}

const STATUSES: [&str; 10] = [
    "Submitted",
    "InProgress",
    "Completed",
    "Failed",
    "Stopping",
    "Stopped",
    "PartiallyCompleted",
    "Expired",
    "Validating",
    "Scheduled",
];

fn list_query(raw: Option<&str>) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery { max_results: 1000, descending: true, ..Default::default() };
    for (key, value) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let stamp = |v: &str| {
            v.parse::<Timestamp>().map_err(|_| ApiError::validation(format!("{key} {v:?} is not an ISO 8601 time")))
        };
        match key.as_ref() {
            "submitTimeAfter" => q.after = Some(stamp(&value)?),
            "submitTimeBefore" => q.before = Some(stamp(&value)?),
            "statusEquals" => {
                if !STATUSES.contains(&value.as_ref()) {
                    return Err(ApiError::validation(format!(
                        "statusEquals {value:?} must be one of {}",
                        STATUSES.join(", ")
                    )));
                }
                q.status = Some(value.into_owned());
            }
            "nameContains" => q.name_contains = Some(value.into_owned()),
            "maxResults" => {
                q.max_results = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::validation("maxResults must be a whole number from 1 to 1000"))?;
            }
            "nextToken" => {
                q.next = value.parse().map_err(|_| ApiError::validation("nextToken is not one this API gave"))?;
            }
            "sortBy" if value == "CreationTime" => {}
            "sortBy" => return Err(ApiError::validation("sortBy must be CreationTime")),
            "sortOrder" => {
                q.descending = match value.as_ref() {
                    "Descending" => true,
                    "Ascending" => false,
                    _ => return Err(ApiError::validation("sortOrder must be Ascending or Descending")),
                }
            }
            other => return Err(ApiError::validation(format!("the query parameter {other:?} is not supported"))),
        }
    }
    Ok(q)
}

pub async fn list(
    State(state): State<Shared>,
    Extension(_caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> Response {
    let result = async {
        let q = list_query(raw.as_deref())?;
        let mut jobs: Vec<Value> = backend(&state)?.list().await?.iter().map(|j| view(&state, j)).collect();
        jobs.retain(|j| {
            let submitted: Option<Timestamp> = j["submitTime"].as_str().and_then(|s| s.parse().ok());
            q.status.as_deref().is_none_or(|s| j["status"] == s)
                && q.name_contains.as_deref().is_none_or(|n| j["jobName"].as_str().is_some_and(|name| name.contains(n)))
                && q.after.is_none_or(|a| submitted.is_some_and(|t| t > a))
                && q.before.is_none_or(|b| submitted.is_some_and(|t| t < b))
        });
        // By submit time, then name (stable pages).
        jobs.sort_by(|a, b| {
            (a["submitTime"].as_str(), a["jobName"].as_str()).cmp(&(b["submitTime"].as_str(), b["jobName"].as_str()))
        });
        if q.descending {
            jobs.reverse();
        }
        let total = jobs.len();
        let page: Vec<Value> = jobs.into_iter().skip(q.next).take(q.max_results).collect();
        let mut body = json!({ "invocationJobSummaries": page });
        if q.next + q.max_results < total {
            body["nextToken"] = (q.next + q.max_results).to_string().into();
        }
        Ok::<_, ApiError>(axum::Json(body).into_response())
    }
    .await;
    result.unwrap_or_else(ApiError::into_bedrock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_are_checked() {
        let q = list_query(Some("statusEquals=InProgress&nameContains=sum&maxResults=5&sortOrder=Ascending")).unwrap();
        assert_eq!(
            (q.status.as_deref(), q.name_contains.as_deref(), q.max_results, q.descending),
            (Some("InProgress"), Some("sum"), 5, false)
        );
        let q = list_query(Some("submitTimeAfter=2026-12-01T00%3A00%3A00Z")).unwrap();
        assert!(q.after.is_some());
        for (query, want) in [
            ("statusEquals=Running", "statusEquals"),
            ("maxResults=0", "maxResults"),
            ("maxResults=1001", "maxResults"),
            ("sortOrder=ASCENDING", "sortOrder"),
            ("sortBy=Name", "sortBy"),
            ("nextToken=abc", "nextToken"),
            ("submitTimeAfter=yesterday", "ISO 8601"),
            ("bogus=1", "bogus"),
        ] {
            let err = list_query(Some(query)).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(want), "{query}: {err}");
        }
    }
}
