//! The plan: which runner pools should exist, pure. Both executors start here — the Kubernetes
//! controllers render each pool into a Deployment, a Service and a PodDisruptionBudget; `mantle
//! dev` runs each pool's replicas as local processes — so the two cannot drift.
//!
//! Rules:
//! - A FoundationModel gets a shared pool in each of its Cells (`spec.cells`, or every Active
//!   Cell when empty; one pool without a Cell when no Cell exists at all). `replicas.min` and
//!   `replicas.max` bound each pool: a Cell is a failure domain that serves on its own.
//! - A Disabled Cell gets no pools. A Draining Cell keeps its pools until replacements are ready:
//!   its replicas are added to the model's Active Cells, and its own pools go to zero only once
//!   every one of those replacement pools reports as many ready replicas as it should have — so
//!   capacity never drops below what the drained Cell held.
//! - A ProvisionedThroughput gets a dedicated pool for its tenant, `ceil(modelUnits ×
//!   tokensPerMinutePerUnit ÷ per-replica throughput)` replicas (the throughput the runners
//!   report, else one model unit's worth per replica), spread over the model's Active Cells.
//! - The autoscaler's decision (observed) sets a shared pool's replicas within its bounds;
//!   without one, a pool runs its minimum. A dedicated pool never scales below its reservation.
//! - What cannot be planned (a missing Cell, a reservation for an unknown model or one that
//!   cannot be provisioned, two pools that would take one name) is a [`Problem`] for the
//!   resource's status; what can still be planned for it is (the Cells that exist).
//!
//! The plan is deterministic: pools come sorted by name, and names are stable.

use std::collections::{BTreeMap, BTreeSet};

use mantle_crds::{Cell, CellState, FoundationModel, ProvisionedThroughput};
use sha2::{Digest, Sha256};

/// What should run: the resources, as the API server (or the manifests directory) has them.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub models: Vec<FoundationModel>,
    pub provisioned: Vec<ProvisionedThroughput>,
    pub cells: Vec<Cell>,
}

impl Desired {
    /// The resources among `manifests` that planning reads.
    pub fn from_manifests(manifests: impl IntoIterator<Item = mantle_crds::Manifest>) -> Self {
        let mut desired = Desired::default();
        for manifest in manifests {
            match manifest {
                mantle_crds::Manifest::FoundationModel(m) => desired.models.push(m),
                mantle_crds::Manifest::ProvisionedThroughput(p) => desired.provisioned.push(p),
                mantle_crds::Manifest::Cell(c) => desired.cells.push(c),
                _ => {}
            }
        }
        desired
    }
}

/// What is running, as far as planning needs to know.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// By pool name.
    pub pools: BTreeMap<String, PoolObservation>,
    /// Tokens a minute one replica of a model (by model id) serves, as the runners report it.
    pub tokens_per_minute_per_replica: BTreeMap<String, f64>,
}

/// One pool as observed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolObservation {
    /// Replicas ready to serve.
    pub ready: i32,
    /// The autoscaler's last decision for the pool, if it made one.
    pub autoscaled: Option<i32>,
}

/// A runner pool that should exist.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolPlan {
    /// The name of the pool's objects (a DNS label, at most 63 characters).
    pub name: String,
    pub namespace: Option<String>,
    /// The FoundationModel (by name) the pool serves, and its model id.
    pub model: String,
    pub model_id: String,
    /// The Cell it runs in; `None` where no Cell exists.
    pub cell: Option<String>,
    /// The tenant of a dedicated pool, and the ProvisionedThroughput (by name) it serves.
    pub dedicated: Option<Dedicated>,
    pub replicas: i32,
    /// The bounds the autoscaler keeps the pool within.
    pub min: i32,
    pub max: i32,
    /// The pool's Cell is Draining: it gets no new replicas and goes once its replacements serve.
    pub draining: bool,
}

/// A dedicated pool's reservation.
#[derive(Clone, Debug, PartialEq)]
pub struct Dedicated {
    pub tenant: String,
    pub provisioned: String,
}

/// Something in the desired resources that cannot be planned, for the resource's status.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// `FoundationModel` or `ProvisionedThroughput`.
    pub kind: &'static str,
    pub namespace: Option<String>,
    pub name: String,
    /// A CamelCase reason, for a condition.
    pub reason: &'static str,
    pub message: String,
}

/// The pools that should exist, and what could not be planned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub pools: Vec<PoolPlan>,
    pub problems: Vec<Problem>,
}

impl Plan {
    /// The pools of one FoundationModel (shared and dedicated).
    pub fn pools_of<'a>(&'a self, namespace: Option<&'a str>, model: &'a str) -> impl Iterator<Item = &'a PoolPlan> {
        self.pools.iter().filter(move |p| p.model == model && p.namespace.as_deref() == namespace)
    }
}

/// The longest Kubernetes object name the pools use (a Service name is a DNS label).
pub const MAX_NAME: usize = 63;

/// Joins `parts` with `-` into a DNS label; a name that would be too long keeps its start and
/// ends in a hash of the whole, so distinct inputs keep distinct names.
pub fn object_name(parts: &[&str]) -> String {
    let full = parts.join("-");
    if full.len() <= MAX_NAME {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let mut end = MAX_NAME - hash.len() - 1;
    while !full.is_char_boundary(end) {
        end -= 1;
    }
    let keep = full[..end].trim_end_matches('-');
    format!("{keep}-{hash}")
}

fn name_of<T: kube::Resource>(r: &T) -> String {
    r.meta().name.clone().unwrap_or_default()
}

/// The Cells a model is placed on, by name: (Active, Draining), or the problem naming what is
/// missing. `None` in the first list means "no Cell" (none exist).
fn model_cells(model: &FoundationModel, cells: &[Cell]) -> (Vec<Option<String>>, Vec<String>, Option<String>) {
    let same_ns: Vec<&Cell> = cells.iter().filter(|c| c.metadata.namespace == model.metadata.namespace).collect();
    if model.spec.cells.is_empty() {
        if same_ns.is_empty() {
            return (vec![None], Vec::new(), None);
        }
        let active = same_ns.iter().filter(|c| c.spec.state == CellState::Active).map(|c| Some(name_of(*c))).collect();
        let draining = same_ns.iter().filter(|c| c.spec.state == CellState::Draining).map(|c| name_of(*c)).collect();
        return (active, draining, None);
    }
    let (mut active, mut draining, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for wanted in &model.spec.cells {
        match same_ns.iter().find(|c| c.metadata.name.as_deref() == Some(wanted)) {
            Some(c) if c.spec.state == CellState::Active => active.push(Some(wanted.clone())),
            Some(c) if c.spec.state == CellState::Draining => draining.push(wanted.clone()),
            Some(_) => {}
            None => missing.push(wanted.as_str()),
        }
    }
    let problem =
        (!missing.is_empty()).then(|| format!("no Cell named {} exists in the namespace", missing.join(", ")));
    (active, draining, problem)
}

/// Plans every pool.
pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let mut plan = Plan::default();
    for model in &desired.models {
        plan_model(model, desired, observed, &mut plan);
    }
    for pt in &desired.provisioned {
        plan_provisioned(pt, desired, observed, &mut plan);
    }
    plan.pools.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    // Two pools may not share a name (a Cell `a-gold` beside a reservation `gold` in Cell `a`):
    // the first keeps it, the other is not planned and its owner says why.
    let mut kept: Vec<PoolPlan> = Vec::with_capacity(plan.pools.len());
    for pool in std::mem::take(&mut plan.pools) {
        match kept.last() {
            Some(last) if last.name == pool.name && last.namespace == pool.namespace => {
                let (kind, name) = match &pool.dedicated {
                    Some(d) => ("ProvisionedThroughput", d.provisioned.clone()),
                    None => ("FoundationModel", pool.model.clone()),
                };
                plan.problems.push(Problem {
                    kind,
                    namespace: pool.namespace.clone(),
                    name,
                    reason: "NameCollision",
                    message: format!("its pool {} would take the name of another; rename one of them", pool.name),
                });
            }
            _ => kept.push(pool),
        }
    }
    plan.pools = kept;
    plan
}

fn problem<T: kube::Resource>(kind: &'static str, r: &T, reason: &'static str, message: String) -> Problem {
    Problem { kind, namespace: r.meta().namespace.clone(), name: name_of(r), reason, message }
}

fn plan_model(model: &FoundationModel, desired: &Desired, observed: &Observed, plan: &mut Plan) {
    let name = name_of(model);
    if name.len() > MAX_NAME {
        // Its name is a label value on every object of its pools, which the router reads.
        let message = format!("the name is {} characters; a FoundationModel's name is at most {MAX_NAME}", name.len());
        plan.problems.push(problem("FoundationModel", model, "NameTooLong", message));
        return;
    }
    let (active, draining, missing) = model_cells(model, &desired.cells);
    let nothing_active = active.is_empty();
    match missing {
        Some(message) => plan.problems.push(problem("FoundationModel", model, "CellNotFound", message)),
        None if nothing_active => {
            let message = "none of the model's Cells is Active".to_string();
            plan.problems.push(problem("FoundationModel", model, "NoActiveCell", message));
        }
        None => {}
    }
    let replicas = &model.spec.replicas;
    let (min, max) = (replicas.min.max(0), replicas.max.max(replicas.min).max(1));
    let pool_name = |cell: Option<&str>| match cell {
        Some(cell) => object_name(&[&name, cell]),
        None => object_name(&[&name]),
    };
    let scaled = |pool: &str| observed.pools.get(pool).and_then(|o| o.autoscaled).unwrap_or(min).clamp(min, max);
    let shared = |cell: Option<String>, replicas: i32, min: i32, max: i32, draining: bool| PoolPlan {
        name: pool_name(cell.as_deref()),
        namespace: model.metadata.namespace.clone(),
        model: name.clone(),
        model_id: model.spec.model_id.clone(),
        cell,
        dedicated: None,
        replicas,
        min,
        max,
        draining,
    };
    // What each Draining Cell holds now is made up in the Active Cells, spread evenly (the first
    // Cells take the remainder).
    // A Draining Cell holds what it runs: the autoscaler's last word, or what is ready there.
    let held = |pool: &str| scaled(pool).max(observed.pools.get(pool).map_or(0, |o| o.ready));
    let drained: Vec<(String, i32)> = draining
        .into_iter()
        .map(|c| {
            let held = held(&pool_name(Some(&c)));
            (c, held)
        })
        .filter(|(_, held)| *held > 0)
        .collect();
    let moved: i32 = drained.iter().map(|(_, held)| held).sum();
    let n = active.len().max(1) as i32;
    let mut replacements = Vec::new();
    for (i, cell) in active.into_iter().enumerate() {
        let extra = moved / n + i32::from((i as i32) < moved % n);
        let pool = shared(cell, 0, min, max + extra, false);
        let replicas = scaled(&pool.name) + extra;
        replacements.push((pool.name.clone(), replicas));
        plan.pools.push(PoolPlan { replicas, ..pool });
    }
    // A Draining Cell's pool goes to zero only once every replacement serves.
    let replaced = !replacements.is_empty()
        && replacements.iter().all(|(pool, want)| observed.pools.get(pool).is_some_and(|o| o.ready >= *want));
    for (cell, held) in drained {
        plan.pools.push(shared(Some(cell), if replaced { 0 } else { held }, 0, held, true));
    }
}

fn plan_provisioned(pt: &ProvisionedThroughput, desired: &Desired, observed: &Observed, plan: &mut Plan) {
    let kind = "ProvisionedThroughput";
    let Some(model) = desired
        .models
        .iter()
        .find(|m| m.spec.model_id == pt.spec.model_id && m.metadata.namespace == pt.metadata.namespace)
    else {
        let message = format!("no FoundationModel in the namespace serves {}", pt.spec.model_id);
        plan.problems.push(problem(kind, pt, "ModelNotFound", message));
        return;
    };
    let Some(per_unit) = model.spec.provisioning.as_ref().map(|p| p.tokens_per_minute_per_unit).filter(|&t| t > 0)
    else {
        let message = format!("{} does not offer provisioned throughput (no spec.provisioning)", pt.spec.model_id);
        plan.problems.push(problem(kind, pt, "NotProvisionable", message));
        return;
    };
    let wanted = pt.spec.model_units.max(1) as f64 * per_unit as f64;
    let per_replica = observed
        .tokens_per_minute_per_replica
        .get(&pt.spec.model_id)
        .copied()
        .filter(|t| *t > 0.0)
        .unwrap_or(per_unit as f64);
    let total = (wanted / per_replica).ceil().max(1.0) as i32;
    let (active, draining, _) = model_cells(model, &desired.cells);
    if active.is_empty() {
        let message = format!("{} has no Active Cell to run the reservation in", name_of(model));
        plan.problems.push(problem(kind, pt, "NoActiveCell", message));
    }
    let (model_name, pt_name) = (name_of(model), name_of(pt));
    let pool_name = |cell: &Option<String>| match cell {
        Some(cell) => object_name(&[&model_name, cell, &pt_name]),
        None => object_name(&[&model_name, &pt_name]),
    };
    let pool = |cell: Option<String>, replicas: i32, min: i32, draining: bool| PoolPlan {
        name: pool_name(&cell),
        namespace: pt.metadata.namespace.clone(),
        model: model_name.clone(),
        model_id: model.spec.model_id.clone(),
        cell,
        dedicated: Some(Dedicated { tenant: pt.spec.tenant.clone(), provisioned: pt_name.clone() }),
        replicas,
        min,
        max: replicas,
        draining,
    };
    // The reservation's replicas, spread over the Active Cells (the first take the remainder).
    let cells: BTreeSet<Option<String>> = active.into_iter().collect();
    let n = cells.len().max(1) as i32;
    let mut replacements = Vec::new();
    for (i, cell) in cells.into_iter().enumerate() {
        let replicas = total / n + i32::from((i as i32) < total % n);
        if replicas > 0 {
            let p = pool(cell, replicas, replicas, false);
            replacements.push((p.name.clone(), replicas));
            plan.pools.push(p);
        }
    }
    // In a Draining Cell the reservation keeps what serves there until the Active Cells' pools do.
    let replaced = !replacements.is_empty()
        && replacements.iter().all(|(name, want)| observed.pools.get(name).is_some_and(|o| o.ready >= *want));
    for cell in draining {
        let held = observed.pools.get(&pool_name(&Some(cell.clone()))).map_or(0, |o| o.ready);
        if held > 0 {
            plan.pools.push(pool(Some(cell), if replaced { 0 } else { held }, 0, true));
        }
    }
}
