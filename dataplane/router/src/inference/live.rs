//! What the router serves at one moment: the platform snapshot, replaced whole on a change.

use super::*;

/// What the router serves right now; replaced whole when the platform changes (a FoundationModel,
/// a Cell or an EndpointSlice in Kubernetes).
pub struct Live {
    pub catalog: Catalog,
    /// The runners of every Cell that is not Disabled (and those in no known Cell).
    pub runners: Runners,
    /// Provisioned model units by (tenant, model id).
    pub provisioned: HashMap<(String, String), f64>,
    /// The ProvisionedThroughputs by name (what their ARNs end in); names repeat across
    /// namespaces.
    pub provisioned_models: HashMap<String, Vec<ProvisionedModel>>,
    /// Each known Cell's `shuffleShardSize`: how many of its runners one tenant is spread over.
    pub cell_shards: HashMap<String, usize>,
}

impl Live {
    pub(super) fn new(platform: Platform, previous: &Runners) -> Result<Self, SetupError> {
        let mut provisioned = HashMap::new();
        for p in &platform.provisioned {
            *provisioned.entry((p.spec.tenant.clone(), p.spec.model_id.clone())).or_insert(0.0) +=
                p.spec.model_units.max(1) as f64;
        }
        let mut provisioned_models: HashMap<String, Vec<ProvisionedModel>> = HashMap::new();
        for p in &platform.provisioned {
            let Some(name) = p.metadata.name.clone() else { continue };
            provisioned_models.entry(name).or_default().push(ProvisionedModel {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                tenant: p.spec.tenant.clone(),
                model_id: p.spec.model_id.clone(),
            });
        }
        let disabled: Vec<&str> =
            platform.cells.iter().filter(|c| c.spec.state == CellState::Disabled).map(cell_name).collect();
        let (runners, off): (Vec<_>, Vec<_>) =
            platform.runners.into_iter().partition(|r| r.cell.as_deref().is_none_or(|c| !disabled.contains(&c)));
        if !off.is_empty() {
            tracing::info!(cells = ?disabled, runners = off.len(), "runners in Disabled Cells get no traffic");
        }
        Ok(Live {
            catalog: Catalog::from_resources(&platform.models),
            runners: previous.update(runners)?,
            provisioned,
            provisioned_models,
            cell_shards: platform
                .cells
                .iter()
                .map(|c| (cell_name(c).to_string(), c.spec.shuffle_shard_size.max(0) as usize))
                .collect(),
        })
    }
}

/// A ProvisionedThroughput as a model id resolves it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProvisionedModel {
    /// Its namespace (empty outside Kubernetes): the account field of its ARN.
    pub namespace: String,
    pub tenant: String,
    pub model_id: String,
}

impl Live {
    /// The ProvisionedThroughput a provisioned-model ARN names:
    /// `arn:PARTITION:bedrock:REGION:ACCOUNT:provisioned-model/NAME`. ACCOUNT is its namespace
    /// (the ARN in its status says so); any account will do where NAME is unique.
    pub fn provisioned_model(&self, arn: &str) -> Result<Option<&ProvisionedModel>, ApiError> {
        let Some((head, name)) = arn.strip_prefix("arn:").and_then(|a| a.split_once(":provisioned-model/")) else {
            return Ok(None);
        };
        let account = head.rsplit(':').next().unwrap_or_default();
        let same_name = self.provisioned_models.get(name).map_or(&[][..], Vec::as_slice);
        match same_name {
            [] => Err(ApiError::NotFound(format!("No provisioned model throughput is named {name:?}."))),
            [only] => Ok(Some(only)),
            many => many.iter().find(|p| p.namespace == account).map(Some).ok_or_else(|| {
                let namespaces: Vec<&str> = many.iter().map(|p| p.namespace.as_str()).collect();
                ApiError::validation(format!(
                    "{name:?} names a provisioned model throughput in each of the namespaces {namespaces:?}; use the \
                     ARN in its status, whose account field is its namespace."
                ))
            }),
        }
    }
}

pub(super) fn cell_name(cell: &Cell) -> &str {
    cell.metadata.name.as_deref().unwrap_or_default()
}
