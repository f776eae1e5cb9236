//! The models the router serves, from FoundationModel resources: how a client's model id (plain,
//! ARN or inference-profile id) resolves to one, what it costs, whether it is past its end of
//! life, and where it falls back to.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use mantle_crds::{FallbackTrigger, FoundationModel, InvokeModelBody, LifecycleStatus, Modality};

use crate::error::ApiError;

/// One servable model.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    pub model_id: String,
    /// The FoundationModel's name.
    pub name: String,
    pub provider: String,
    pub modality: Modality,
    /// The native InvokeModel body the model takes (its family).
    pub invoke_body: InvokeModelBody,
    pub context_length: u32,
    /// US dollars per 1,000 input and output tokens.
    pub price_in: f64,
    pub price_out: f64,
    pub legacy: bool,
    /// Seconds since the epoch after which the model no longer serves, and the same as
    /// ISO 8601.
    pub end_of_life: Option<(i64, String)>,
    pub fallbacks: Vec<(String, FallbackTrigger)>,
    /// Tokens per minute one provisioned model unit buys.
    pub tokens_per_minute_per_unit: Option<u64>,
    /// Whether its shared pool may run no replica (`replicas.min: 0`): requests then wait for one
    /// to start instead of being refused.
    pub scales_from_zero: bool,
}

impl ModelEntry {
    pub fn from_resource(fm: &FoundationModel) -> Self {
        let spec = &fm.spec;
        ModelEntry {
            model_id: spec.model_id.clone(),
            name: fm.metadata.name.clone().unwrap_or_else(|| spec.model_id.clone()),
            provider: spec.provider.clone(),
            modality: spec.modality,
            invoke_body: InvokeModelBody::of(spec.invoke_model_body, &spec.model_id, spec.modality),
            context_length: spec.context_length.max(0) as u32,
            price_in: spec.pricing.as_ref().map_or(0.0, |p| p.input_per_1k_tokens),
            price_out: spec.pricing.as_ref().map_or(0.0, |p| p.output_per_1k_tokens),
            legacy: spec.lifecycle.status == LifecycleStatus::Legacy,
            end_of_life: spec.lifecycle.end_of_life.as_ref().map(|t| (t.0.as_second(), t.0.to_string())),
            fallbacks: spec.fallbacks.iter().map(|f| (f.model_id.clone(), f.on)).collect(),
            tokens_per_minute_per_unit: spec.provisioning.as_ref().map(|p| p.tokens_per_minute_per_unit.max(0) as u64),
            scales_from_zero: spec.replicas.min == 0,
        }
    }

    /// The price of a request in US dollars.
    pub fn cost(&self, input_tokens: u32, output_tokens: u32) -> f64 {
        (input_tokens as f64 * self.price_in + output_tokens as f64 * self.price_out) / 1000.0
    }

    pub fn arn(&self, region: &str) -> String {
        format!("arn:aws:bedrock:{region}::foundation-model/{}", self.model_id)
    }

    /// Refuses a model past its end of life, as Bedrock does (a validation error).
    pub fn check_serving(&self, now: SystemTime) -> Result<(), ApiError> {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        match self.end_of_life {
            Some((eol, _)) if now >= eol => Err(ApiError::validation(format!(
                "The model {} has reached the end of its life and no longer serves requests; use a newer version.",
                self.model_id
            ))),
            _ => Ok(()),
        }
    }

    pub fn summary(&self, region: &str) -> serde_json::Value {
        let (input, output) = match self.modality {
            Modality::Text => (vec!["TEXT"], vec!["TEXT"]),
            Modality::Embedding => (vec!["TEXT"], vec!["EMBEDDING"]),
        };
        let mut lifecycle = serde_json::json!({ "status": if self.legacy { "LEGACY" } else { "ACTIVE" } });
        if let Some((_, eol)) = &self.end_of_life {
            lifecycle["endOfLifeTime"] = eol.clone().into();
        }
        let mut inference = vec!["ON_DEMAND"];
        if self.tokens_per_minute_per_unit.is_some() {
            inference.push("PROVISIONED");
        }
        serde_json::json!({
            "modelArn": self.arn(region),
            "modelId": self.model_id,
            "modelName": self.name,
            "providerName": self.provider,
            "inputModalities": input,
            "outputModalities": output,
            "responseStreamingSupported": self.modality == Modality::Text,
            "customizationsSupported": [],
            "inferenceTypesSupported": inference,
            "modelLifecycle": lifecycle,
        })
    }
}

/// All models by id.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    models: BTreeMap<String, ModelEntry>,
}

/// Geography prefixes of Bedrock's cross-region inference-profile ids (`us.meta.llama…`).
const PROFILE_PREFIXES: &[&str] = &["us.", "eu.", "apac.", "us-gov.", "ca.", "jp.", "au.", "global."];

impl Catalog {
    pub fn new(models: impl IntoIterator<Item = ModelEntry>) -> Self {
        Catalog { models: models.into_iter().map(|m| (m.model_id.clone(), m)).collect() }
    }

    pub fn from_resources<'a>(resources: impl IntoIterator<Item = &'a FoundationModel>) -> Self {
        Self::new(resources.into_iter().map(ModelEntry::from_resource))
    }

    pub fn iter(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models.values()
    }

    pub fn get(&self, model_id: &str) -> Option<&ModelEntry> {
        self.models.get(model_id)
    }

    /// Resolves what a client sent as a model id: the id itself, a foundation-model ARN, or an
    /// inference-profile id (`us.<model id>`). Unknown ids are 404 ResourceNotFoundException.
    pub fn resolve(&self, requested: &str) -> Result<&ModelEntry, ApiError> {
        if let Some(m) = self.models.get(requested) {
            return Ok(m);
        }
        let tail = requested.strip_prefix("arn:").and_then(|_| requested.rsplit_once('/')).map(|(_, id)| id);
        let candidates = tail.into_iter().chain(PROFILE_PREFIXES.iter().filter_map(|p| requested.strip_prefix(p)));
        for id in candidates {
            let id = PROFILE_PREFIXES.iter().find_map(|p| id.strip_prefix(p)).unwrap_or(id);
            if let Some(m) = self.models.get(id) {
                return Ok(m);
            }
        }
        Err(ApiError::NotFound(format!(
            "The model {requested} does not exist or is not served here; ListFoundationModels shows the models you can call."
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> ModelEntry {
        ModelEntry {
            model_id: id.into(),
            name: "m".into(),
            provider: "p".into(),
            modality: Modality::Text,
            invoke_body: InvokeModelBody::AnthropicMessages,
            context_length: 8192,
            price_in: 0.5,
            price_out: 1.5,
            legacy: false,
            end_of_life: None,
            fallbacks: Vec::new(),
            tokens_per_minute_per_unit: None,
            scales_from_zero: false,
        }
    }

    #[test]
    fn ids_arns_and_profiles_resolve() {
        let c = Catalog::new([entry("meta.llama3-8b-instruct-v1:0")]);
        for id in [
            "meta.llama3-8b-instruct-v1:0",
            "arn:aws:bedrock:us-east-1::foundation-model/meta.llama3-8b-instruct-v1:0",
            "us.meta.llama3-8b-instruct-v1:0",
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.meta.llama3-8b-instruct-v1:0",
        ] {
            assert_eq!(c.resolve(id).map(|m| m.model_id.as_str()).ok(), Some("meta.llama3-8b-instruct-v1:0"), "{id}");
        }
        let err = c.resolve("anthropic.claude-v2").unwrap_err();
        assert_eq!(err.kind(), "ResourceNotFoundException");
        assert!(c.resolve("arn:").is_err() && c.resolve("").is_err());
    }

    #[test]
    fn end_of_life_refuses_with_a_validation_error() {
        let mut m = entry("a.b-v1:0");
        m.end_of_life = Some((1_000, "1970-01-01T00:16:40Z".into()));
        assert!(m.check_serving(UNIX_EPOCH + std::time::Duration::from_secs(999)).is_ok());
        assert_eq!(
            m.check_serving(UNIX_EPOCH + std::time::Duration::from_secs(1000)).unwrap_err().kind(),
            "ValidationException"
        );
    }

    #[test]
    fn cost_is_priced_per_thousand_tokens() {
        assert!((entry("a.b-v1:0").cost(1000, 2000) - 3.5).abs() < 1e-9);
    }
}
