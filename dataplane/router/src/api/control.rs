//! The bedrock control-plane reads: ListFoundationModels and GetFoundationModel, from the
//! FoundationModels the router serves.

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use mantle_crds::Modality;
use serde::Deserialize;
use serde_json::json;

use super::{Caller, Shared};
use crate::error::ApiError;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    by_provider: Option<String>,
    by_output_modality: Option<String>,
    by_inference_type: Option<String>,
    by_customization_type: Option<String>,
}

pub async fn list_foundation_models(
    State(state): State<Shared>,
    Extension(_caller): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return ApiError::validation("the query string is malformed").into_bedrock();
    };
    if let Some(m) = query.by_output_modality.as_deref()
        && !["TEXT", "IMAGE", "EMBEDDING"].contains(&m)
    {
        return ApiError::validation(format!("byOutputModality {m:?} must be TEXT, IMAGE or EMBEDDING")).into_bedrock();
    }
    let region = &state.inference.config.region;
    let summaries: Vec<_> = state
        .inference
        .live()
        .catalog
        .iter()
        .filter(|m| query.by_provider.as_deref().is_none_or(|p| m.provider.eq_ignore_ascii_case(p)))
        .filter(|m| match query.by_output_modality.as_deref() {
            Some("TEXT") => m.modality == Modality::Text,
            Some("EMBEDDING") => m.modality == Modality::Embedding,
            Some(_) => false,
            None => true,
        })
        .filter(|m| match query.by_inference_type.as_deref() {
            Some("PROVISIONED") => m.tokens_per_minute_per_unit.is_some(),
            _ => true,
        })
        // Mantle serves no customized models.
        .filter(|_| query.by_customization_type.is_none())
        .map(|m| m.summary(region))
        .collect();
    axum::Json(json!({ "modelSummaries": summaries })).into_response()
}

pub async fn get_foundation_model(
    State(state): State<Shared>,
    Extension(_caller): Extension<Caller>,
    Path(model_id): Path<String>,
) -> Response {
    match state.inference.live().catalog.resolve(&model_id) {
        Ok(m) => axum::Json(json!({ "modelDetails": m.summary(&state.inference.config.region) })).into_response(),
        Err(e) => e.into_bedrock(),
    }
}
