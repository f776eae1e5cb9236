//! What the operator writes into the resources' status, pure: from the plan, what is observed
//! and the previous status (a condition keeps its `lastTransitionTime` while its status holds).

use mantle_crds::{
    CellReplicas, Condition, FoundationModel, FoundationModelStatus, LifecycleStatus, ModelPhase, ProvisionedPhase,
    ProvisionedThroughput, ProvisionedThroughputStatus, Time,
};

use crate::plan::{Observed, Plan, PoolPlan, Problem};
use crate::render::GRPC_PORT;

/// A condition, keeping the previous transition time when its status did not change.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

fn ready_of(pool: &PoolPlan, observed: &Observed) -> i32 {
    observed.pools.get(&pool.name).map_or(0, |o| o.ready).min(pool.replicas.max(0))
}

fn problems_of<'a>(
    plan: &'a Plan,
    kind: &'a str,
    namespace: &'a Option<String>,
    name: &'a str,
) -> impl Iterator<Item = &'a Problem> {
    plan.problems.iter().filter(move |p| p.kind == kind && p.namespace == *namespace && p.name == name)
}

/// A FoundationModel's status: its pools' replicas per Cell, its endpoints, its phase, and the
/// conditions `SpecValid`, `Available`, `Degraded` and `Deprecated`.
pub fn model_status(model: &FoundationModel, plan: &Plan, observed: &Observed, now: &Time) -> FoundationModelStatus {
    let name = model.metadata.name.as_deref().unwrap_or_default();
    let namespace = &model.metadata.namespace;
    let generation = model.metadata.generation;
    let previous = model.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let pools: Vec<&PoolPlan> = plan.pools_of(namespace.as_deref(), name).collect();
    let mut cells: Vec<CellReplicas> = Vec::new();
    for pool in &pools {
        let cell = pool.cell.clone().unwrap_or_default();
        let ready = ready_of(pool, observed);
        match cells.iter_mut().find(|c| c.cell == cell) {
            Some(c) => {
                c.ready += ready;
                c.desired += pool.replicas;
            }
            None => cells.push(CellReplicas { cell, ready, desired: pool.replicas }),
        }
    }
    cells.retain(|c| !c.cell.is_empty() || c.desired > 0);
    let ready: i32 = pools.iter().map(|p| ready_of(p, observed)).sum();
    let desired: i32 = pools.iter().map(|p| p.replicas).sum();
    let problem = problems_of(plan, "FoundationModel", namespace, name).next();
    let phase = match (problem, ready, desired) {
        (Some(_), _, _) if pools.is_empty() => ModelPhase::Failed,
        (_, 0, 0) => ModelPhase::Ready,
        (_, 0, _) => ModelPhase::Pending,
        (_, r, d) if r < d => ModelPhase::Degraded,
        _ => ModelPhase::Ready,
    };
    let scaled_to_zero = desired == 0 && pools.iter().all(|p| p.min == 0) && !pools.is_empty();
    let (available, reason, message) = match (problem, ready) {
        (_, r) if r > 0 => (true, "ReplicasReady", format!("{r} of {desired} replicas ready")),
        _ if scaled_to_zero => (true, "ScaledToZero", "replicas.min is 0 and nothing asks for more".to_string()),
        (Some(p), _) => (false, p.reason, p.message.clone()),
        (None, _) => (false, "ReplicasNotReady", format!("0 of {desired} replicas ready")),
    };
    let mut conditions = vec![
        condition(previous, "SpecValid", true, "Valid", String::new(), generation, now),
        condition(previous, "Available", available, reason, message, generation, now),
        condition(
            previous,
            "Degraded",
            ready < desired || problem.is_some(),
            match problem {
                Some(p) => p.reason,
                None if ready < desired => "ReplicasNotReady",
                None => "AllReplicasReady",
            },
            problem.map_or_else(|| format!("{ready} of {desired} replicas ready"), |p| p.message.clone()),
            generation,
            now,
        ),
    ];
    let lifecycle = &model.spec.lifecycle;
    if lifecycle.status == LifecycleStatus::Legacy || lifecycle.end_of_life.is_some() {
        let end = lifecycle.end_of_life.as_ref().map_or_else(String::new, |t| format!("; end of life {}", t.0));
        conditions.push(condition(
            previous,
            "Deprecated",
            true,
            if lifecycle.status == LifecycleStatus::Legacy { "Legacy" } else { "EndOfLifeSet" },
            format!(
                "the model is {}{end}: requests after its end of life are refused",
                if lifecycle.status == LifecycleStatus::Legacy { "LEGACY" } else { "ACTIVE" }
            ),
            generation,
            now,
        ));
    }
    FoundationModelStatus {
        phase: Some(phase),
        conditions,
        ready_replicas: ready,
        cells,
        endpoints: pools
            .iter()
            .map(|p| match namespace {
                Some(ns) => format!("{}.{ns}.svc:{GRPC_PORT}", p.name),
                None => format!("{}:{GRPC_PORT}", p.name),
            })
            .collect(),
        weights_sha256: model.spec.fetched_weights().and_then(|s| s.sha256.clone()),
        weights_cached: None,
        observed_generation: generation,
    }
}

/// A FoundationModel whose spec breaks an invariant: nothing is acted on.
pub fn invalid_model_status(
    model: &FoundationModel,
    reason: &str,
    message: String,
    now: &Time,
) -> FoundationModelStatus {
    let previous = model.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = model.metadata.generation;
    let mut status = model.status.clone().unwrap_or_default();
    status.phase = Some(ModelPhase::Failed);
    status.conditions = vec![condition(previous, "SpecValid", false, reason, message, generation, now)];
    status.observed_generation = generation;
    status
}

/// A ProvisionedThroughput's status: its ARN, replicas, capacity and phase.
pub fn provisioned_status(
    pt: &ProvisionedThroughput,
    plan: &Plan,
    observed: &Observed,
    tokens_per_unit: Option<i64>,
    now: &Time,
) -> ProvisionedThroughputStatus {
    let name = pt.metadata.name.as_deref().unwrap_or_default();
    let namespace = &pt.metadata.namespace;
    let generation = pt.metadata.generation;
    let previous = pt.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let pools: Vec<&PoolPlan> = plan
        .pools
        .iter()
        .filter(|p| p.namespace == *namespace && p.dedicated.as_ref().is_some_and(|d| d.provisioned == name))
        .collect();
    let replicas: i32 = pools.iter().map(|p| p.replicas).sum();
    let ready: i32 = pools.iter().map(|p| ready_of(p, observed)).sum();
    let problem = problems_of(plan, "ProvisionedThroughput", namespace, name).next();
    let (phase, available, reason, message) = match problem {
        Some(p) => (ProvisionedPhase::Failed, false, p.reason, p.message.clone()),
        None if ready >= replicas && replicas > 0 => {
            (ProvisionedPhase::InService, true, "ReplicasReady", format!("{ready} of {replicas} replicas ready"))
        }
        None => {
            (ProvisionedPhase::Creating, false, "ReplicasNotReady", format!("{ready} of {replicas} replicas ready"))
        }
    };
    // The ARN is a name clients keep: made once, from the first Cell the reservation ran in.
    let cell = pools.first().and_then(|p| p.cell.clone()).unwrap_or_else(|| "local".into());
    let arn = pt.status.as_ref().and_then(|s| s.arn.clone()).unwrap_or_else(|| {
        format!("arn:mantle:bedrock:{cell}:{}:provisioned-model/{name}", namespace.as_deref().unwrap_or("default"))
    });
    ProvisionedThroughputStatus {
        arn: Some(arn),
        phase: Some(phase),
        provisioned_replicas: replicas,
        capacity_tokens_per_minute: tokens_per_unit.map_or(0, |t| t * pt.spec.model_units.max(0) as i64),
        commitment_expires_at: pt.status.as_ref().and_then(|s| s.commitment_expires_at.clone()),
        conditions: vec![
            condition(previous, "SpecValid", true, "Valid", String::new(), generation, now),
            condition(previous, "Available", available, reason, message, generation, now),
        ],
        observed_generation: generation,
    }
}

/// What a Cell's status reports of one matched node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeFacts {
    pub labels: std::collections::BTreeMap<String, String>,
    pub ready: bool,
    /// `nvidia.com/gpu` allocatable.
    pub gpus: i32,
}

/// A Cell's status: its ready nodes and GPUs (from the nodes its selector matches), the models
/// placed on it and the GPUs their planned replicas take, and its health — `Degraded` while a
/// pool in it has fewer ready replicas than planned, `Unhealthy` when it wants replicas and no
/// node is ready.
pub fn cell_status(
    cell: &mantle_crds::Cell,
    nodes: &[NodeFacts],
    desired: &crate::plan::Desired,
    plan: &Plan,
    observed: &Observed,
    now: &Time,
) -> mantle_crds::CellStatus {
    use mantle_crds::{CellHealth, CellStatus};
    let name = cell.metadata.name.as_deref().unwrap_or_default();
    let namespace = &cell.metadata.namespace;
    let generation = cell.metadata.generation;
    let previous = cell.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let matched: Vec<&NodeFacts> =
        nodes.iter().filter(|n| cell.spec.node_selector.iter().all(|(k, v)| n.labels.get(k) == Some(v))).collect();
    let ready_nodes = matched.iter().filter(|n| n.ready).count() as i32;
    let node_gpus: i32 = matched.iter().filter(|n| n.ready).map(|n| n.gpus).sum();
    let pools: Vec<&PoolPlan> =
        plan.pools.iter().filter(|p| p.namespace == *namespace && p.cell.as_deref() == Some(name)).collect();
    let mut models: Vec<String> =
        pools.iter().map(|p| format!("{}/{}", namespace.as_deref().unwrap_or("default"), p.model)).collect();
    models.sort();
    models.dedup();
    let gpus_of = |pool: &PoolPlan| {
        desired
            .models
            .iter()
            .find(|m| m.metadata.name.as_deref() == Some(&pool.model) && m.metadata.namespace == pool.namespace)
            .map_or(0, |m| m.spec.resources.gpus.max(0))
    };
    let allocated: i32 = pools.iter().map(|p| p.replicas * gpus_of(p)).sum();
    let wanted: i32 = pools.iter().map(|p| p.replicas).sum();
    let short: Vec<String> = pools
        .iter()
        .filter(|p| ready_of(p, observed) < p.replicas)
        .map(|p| format!("{} ({} of {})", p.name, ready_of(p, observed), p.replicas))
        .collect();
    let health = if wanted > 0 && ready_nodes == 0 {
        CellHealth::Unhealthy
    } else if short.is_empty() {
        CellHealth::Healthy
    } else {
        CellHealth::Degraded
    };
    let capacity = cell.spec.capacity.gpus;
    let conditions = vec![
        condition(
            previous,
            "NodesReady",
            ready_nodes > 0,
            if ready_nodes > 0 { "NodesReady" } else { "NoReadyNode" },
            format!("{ready_nodes} of {} matched nodes ready, {node_gpus} GPUs allocatable", matched.len()),
            generation,
            now,
        ),
        condition(
            previous,
            "Degraded",
            !short.is_empty(),
            if short.is_empty() { "AllReplicasReady" } else { "ReplicasNotReady" },
            if short.is_empty() {
                format!("{wanted} replicas ready")
            } else {
                format!("not ready: {}", short.join(", "))
            },
            generation,
            now,
        ),
        condition(
            previous,
            "GpusAvailable",
            allocated <= capacity.min(if matched.is_empty() { capacity } else { node_gpus }) || allocated == 0,
            if allocated == 0 { "NoGpuModels" } else { "Allocated" },
            format!("{allocated} GPUs planned; capacity {capacity}, {node_gpus} allocatable on ready nodes"),
            generation,
            now,
        ),
    ];
    CellStatus {
        health: Some(health),
        model_count: models.len() as i32,
        models_placed: models,
        ready_nodes,
        allocated_gpus: allocated,
        conditions,
        observed_generation: generation,
    }
}

/// For a prewarmed model: `weightsCached` ("2/3 nodes": prewarm pods ready over the nodes the
/// prewarm selects) and the `WeightsCached` condition, from its prewarm DaemonSet as last seen
/// (`None` before the first one is seen). Models without prewarm get neither.
pub fn weights_cached(
    status: &mut FoundationModelStatus,
    model: &FoundationModel,
    daemonset: Option<&std::sync::Arc<k8s_openapi::api::apps::v1::DaemonSet>>,
    now: &Time,
) {
    if model.spec.weight_cache.prewarm.is_none() {
        return;
    }
    let previous = model.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let counts = daemonset.and_then(|d| d.status.as_ref()).map(|s| (s.number_ready, s.desired_number_scheduled));
    let (ready, nodes) = counts.unwrap_or((0, 0));
    status.weights_cached = Some(format!("{ready}/{nodes} nodes"));
    let (cached, reason, message) = match counts {
        None => (false, "Prewarming", "the prewarm DaemonSet has not reported yet".to_string()),
        Some((_, 0)) => (false, "NoNodes", "no node matches weightCache.prewarm within the model's Cells".to_string()),
        Some((r, n)) if r < n => (false, "Prewarming", format!("the weights are cached on {r} of {n} nodes")),
        Some((r, n)) => (true, "Cached", format!("the weights are cached on {r} of {n} nodes")),
    };
    status.conditions.push(condition(
        previous,
        "WeightsCached",
        cached,
        reason,
        message,
        model.metadata.generation,
        now,
    ));
}
