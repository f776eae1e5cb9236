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
    /// Each ProvisionedThroughput by name (what its ARN ends in): its tenant and model id.
    pub provisioned_models: HashMap<String, (String, String)>,
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
        let provisioned_models = platform
            .provisioned
            .iter()
            .filter_map(|p| Some((p.metadata.name.clone()?, (p.spec.tenant.clone(), p.spec.model_id.clone()))))
            .collect();
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

pub(super) fn cell_name(cell: &Cell) -> &str {
    cell.metadata.name.as_deref().unwrap_or_default()
}
