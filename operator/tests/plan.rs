//! The plan's properties: the examples become the pools they should, the plan is deterministic,
//! a drained Cell's capacity moves before it goes, a new Cell moves nothing that runs, and what
//! cannot be planned is a problem with a reason.

use std::path::Path;

use mantle_crds::{Cell, CellState, FoundationModel, Manifest, ProvisionedThroughput};
use mantle_operator::plan::{MAX_NAME, PoolObservation, object_name};
use mantle_operator::{Desired, Observed, Plan, plan};

fn examples() -> Desired {
    let dir = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()))
        .join("../examples");
    let mut desired = Desired::default();
    for (_, manifest) in mantle_crds::read_manifest_dir(&dir).unwrap() {
        match manifest {
            Manifest::FoundationModel(m) => desired.models.push(m),
            Manifest::ProvisionedThroughput(p) => desired.provisioned.push(p),
            Manifest::Cell(c) => desired.cells.push(c),
            _ => {}
        }
    }
    desired
}

fn summary(plan: &Plan) -> Vec<(String, Option<String>, Option<String>, i32)> {
    plan.pools
        .iter()
        .map(|p| (p.name.clone(), p.cell.clone(), p.dedicated.as_ref().map(|d| d.tenant.clone()), p.replicas))
        .collect()
}

fn set_state(desired: &mut Desired, cell: &str, state: CellState) {
    desired.cells.iter_mut().find(|c| c.metadata.name.as_deref() == Some(cell)).unwrap().spec.state = state;
}

fn ready(plan: &Plan) -> Observed {
    let mut observed = Observed::default();
    for p in &plan.pools {
        observed.pools.insert(p.name.clone(), PoolObservation { ready: p.replicas, autoscaled: None });
    }
    observed
}

#[test]
fn the_examples_become_a_pool_per_model_and_cell_and_a_dedicated_pool_per_reservation() {
    let plan = plan(&examples(), &Observed::default());
    assert!(plan.problems.is_empty(), "{:?}", plan.problems);
    let s = |n: &str, c: &str, t: Option<&str>, r: i32| (n.to_string(), Some(c.to_string()), t.map(String::from), r);
    assert_eq!(
        summary(&plan),
        [
            s("all-minilm-l6-v2-cell-a", "cell-a", None, 1),
            s("smollm2-135m-instruct-cell-a", "cell-a", None, 1),
            // Two model units of 60,000 tokens a minute: two replicas, one per Cell.
            s("smollm2-135m-instruct-cell-a-analytics-smollm2", "cell-a", Some("analytics"), 1),
            s("smollm2-135m-instruct-cell-b", "cell-b", None, 1),
            s("smollm2-135m-instruct-cell-b-analytics-smollm2", "cell-b", Some("analytics"), 1),
        ]
    );
    let shared = plan.pools.iter().find(|p| p.name == "smollm2-135m-instruct-cell-a").unwrap();
    assert_eq!((shared.min, shared.max, shared.model_id.as_str()), (1, 4, "huggingfacetb.smollm2-135m-instruct-v1:0"));
}

#[test]
fn the_plan_is_deterministic_whatever_the_order_of_the_resources() {
    let desired = examples();
    let first = plan(&desired, &Observed::default());
    let mut reversed = desired.clone();
    reversed.models.reverse();
    reversed.cells.reverse();
    reversed.provisioned.reverse();
    assert_eq!(plan(&reversed, &Observed::default()), first);
    assert_eq!(plan(&desired, &Observed::default()), first);
}

#[test]
fn a_draining_cell_keeps_its_replicas_until_the_replacements_serve() {
    let mut desired = examples();
    let before = plan(&desired, &Observed::default());
    let capacity = |plan: &Plan, observed: &Observed| -> i32 {
        // What serves: ready replicas of the pools the plan keeps, never more than it wants.
        plan.pools
            .iter()
            .filter(|p| p.dedicated.is_none() && p.model == "smollm2-135m-instruct")
            .map(|p| observed.pools.get(&p.name).map_or(0, |o| o.ready.min(p.replicas)))
            .sum()
    };
    let mut observed = ready(&before);
    let served = capacity(&before, &observed);
    set_state(&mut desired, "cell-b", CellState::Draining);
    // Step 1: the replacement is wanted in cell-a; cell-b keeps its replica.
    let during = plan(&desired, &observed);
    let pool = |plan: &Plan, name: &str| plan.pools.iter().find(|p| p.name == name).cloned().unwrap();
    assert_eq!(pool(&during, "smollm2-135m-instruct-cell-a").replicas, 2);
    let b = pool(&during, "smollm2-135m-instruct-cell-b");
    assert!(b.draining && b.replicas == 1);
    assert!(capacity(&during, &observed) >= served);
    // Step 2: the replacement is ready; only now does cell-b go to zero.
    observed.pools.get_mut("smollm2-135m-instruct-cell-a").unwrap().ready = 2;
    let after = plan(&desired, &observed);
    assert_eq!(pool(&after, "smollm2-135m-instruct-cell-b").replicas, 0);
    assert!(capacity(&after, &observed) >= served);
    // The reservation moves too: cell-a wants both replicas, and cell-b keeps its one until they
    // serve.
    let dedicated = |plan: &Plan| -> Vec<(Option<String>, i32)> {
        plan.pools.iter().filter(|p| p.dedicated.is_some()).map(|p| (p.cell.clone(), p.replicas)).collect()
    };
    assert_eq!(dedicated(&after), [(Some("cell-a".into()), 2), (Some("cell-b".into()), 1)]);
    observed.pools.get_mut("smollm2-135m-instruct-cell-a-analytics-smollm2").unwrap().ready = 2;
    assert_eq!(dedicated(&plan(&desired, &observed)), [(Some("cell-a".into()), 2), (Some("cell-b".into()), 0)]);
    // A Disabled Cell has no pools at all.
    set_state(&mut desired, "cell-b", CellState::Disabled);
    assert!(plan(&desired, &observed).pools.iter().all(|p| p.cell.as_deref() != Some("cell-b")));
}

#[test]
fn adding_a_cell_moves_nothing_that_runs() {
    let mut desired = examples();
    // A model on every Active Cell.
    desired.models[0].spec.cells.clear();
    let before = plan(&desired, &Observed::default());
    let mut cell_c: Cell = desired.cells[0].clone();
    cell_c.metadata.name = Some("cell-c".into());
    desired.cells.push(cell_c);
    let after = plan(&desired, &Observed::default());
    for pool in &before.pools {
        assert!(after.pools.contains(pool), "{} changed or went", pool.name);
    }
    assert_eq!(after.pools.len(), before.pools.len() + 1, "only the new Cell's pool is added");
}

#[test]
fn the_autoscaler_moves_a_shared_pool_within_its_bounds_and_never_a_reservation_below_it() {
    let desired = examples();
    let mut observed = Observed::default();
    for (pool, wanted) in [("smollm2-135m-instruct-cell-a", 9), ("smollm2-135m-instruct-cell-b", 0)] {
        observed.pools.insert(pool.into(), PoolObservation { ready: 0, autoscaled: Some(wanted) });
    }
    observed.pools.insert(
        "smollm2-135m-instruct-cell-a-analytics-smollm2".into(),
        PoolObservation { ready: 0, autoscaled: Some(0) },
    );
    let plan = plan(&desired, &observed);
    let replicas = |name: &str| plan.pools.iter().find(|p| p.name == name).unwrap().replicas;
    assert_eq!(replicas("smollm2-135m-instruct-cell-a"), 4, "capped at max");
    assert_eq!(replicas("smollm2-135m-instruct-cell-b"), 1, "held at min");
    assert_eq!(replicas("smollm2-135m-instruct-cell-a-analytics-smollm2"), 1, "a reservation is not autoscaled");
    // Reported throughput sizes the reservation: half a unit's worth per replica → twice the replicas.
    let mut observed = Observed::default();
    observed.tokens_per_minute_per_replica.insert("huggingfacetb.smollm2-135m-instruct-v1:0".into(), 30_000.0);
    let plan = mantle_operator::plan(&desired, &observed);
    let reserved: i32 = plan.pools.iter().filter(|p| p.dedicated.is_some()).map(|p| p.replicas).sum();
    assert_eq!(reserved, 4);
}

#[test]
fn what_cannot_be_planned_is_a_problem_with_a_reason() {
    let mut desired = examples();
    desired.models[1].spec.cells.push("cell-z".into());
    let mut orphan: ProvisionedThroughput = desired.provisioned[0].clone();
    orphan.metadata.name = Some("orphan".into());
    orphan.spec.model_id = "acme.nothing-v1:0".into();
    desired.provisioned.push(orphan);
    let mut unprovisionable: ProvisionedThroughput = desired.provisioned[0].clone();
    unprovisionable.metadata.name = Some("embeddings".into());
    unprovisionable.spec.model_id = "sentence-transformers.all-minilm-l6-v2-v1:0".into();
    desired.provisioned.push(unprovisionable);
    let plan = plan(&desired, &Observed::default());
    let reasons: Vec<(&str, &str, &str)> = plan.problems.iter().map(|p| (p.kind, p.name.as_str(), p.reason)).collect();
    assert_eq!(
        reasons,
        [
            ("FoundationModel", "smollm2-135m-instruct", "CellNotFound"),
            ("ProvisionedThroughput", "orphan", "ModelNotFound"),
            ("ProvisionedThroughput", "embeddings", "NotProvisionable"),
        ]
    );
    assert!(plan.problems[0].message.contains("cell-z"));
    // The Cells that do exist still get their pools.
    assert!(plan.pools.iter().any(|p| p.name == "smollm2-135m-instruct-cell-b"));
}

#[test]
fn without_cells_a_model_gets_one_pool_named_after_it() {
    let mut desired = examples();
    desired.cells.clear();
    let model: &mut FoundationModel = &mut desired.models[0];
    model.spec.cells.clear();
    let plan = plan(&desired, &Observed::default());
    assert!(plan.pools.iter().any(|p| p.name == "all-minilm-l6-v2" && p.cell.is_none()), "{:?}", summary(&plan));
}

#[test]
fn long_names_stay_dns_labels_and_distinct() {
    let long = "a".repeat(60);
    let (x, y) = (object_name(&[&long, "cell-a"]), object_name(&[&long, "cell-b"]));
    assert!(x.len() <= MAX_NAME && y.len() <= MAX_NAME);
    assert_ne!(x, y);
    assert!(!x.contains("--") && x.starts_with("aaaa"));
    assert_eq!(object_name(&["m", "cell-a"]), "m-cell-a");
}

#[test]
fn a_cell_reports_its_nodes_gpus_models_and_health() {
    use mantle_operator::status::{NodeFacts, cell_status};
    let desired = examples();
    let plan = plan(&desired, &Observed::default());
    let cell = desired.cells.iter().find(|c| c.metadata.name.as_deref() == Some("cell-a")).unwrap();
    let node = |cell: &str, ready: bool, gpus: i32| NodeFacts {
        labels: [("mantle.dev/cell".to_string(), cell.to_string())].into(),
        ready,
        gpus,
    };
    let nodes = [node("cell-a", true, 8), node("cell-a", false, 8), node("cell-b", true, 8)];
    let now = mantle_crds::Time(k8s_openapi::jiff::Timestamp::now());
    let status = cell_status(cell, &nodes, &desired, &plan, &ready(&plan), &now);
    assert_eq!((status.ready_nodes, status.model_count), (1, 2));
    assert_eq!(status.models_placed, ["default/all-minilm-l6-v2", "default/smollm2-135m-instruct"]);
    assert_eq!(status.allocated_gpus, 0, "the examples run on CPU");
    assert_eq!(status.health, Some(mantle_crds::CellHealth::Healthy));
    // A pool short of ready replicas makes the Cell Degraded, naming it; no ready node, Unhealthy.
    let status = cell_status(cell, &nodes, &desired, &plan, &Observed::default(), &now);
    assert_eq!(status.health, Some(mantle_crds::CellHealth::Degraded));
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert!(degraded.message.contains("smollm2-135m-instruct-cell-a (0 of 1)"), "{}", degraded.message);
    let status = cell_status(cell, &[node("cell-a", false, 8)], &desired, &plan, &ready(&plan), &now);
    assert_eq!(status.health, Some(mantle_crds::CellHealth::Unhealthy));
}

#[test]
fn two_pools_that_would_share_a_name_are_a_problem_not_a_fight() {
    let mut desired = examples();
    // A Cell named so that SmolLM2's shared pool in it takes the reservation's pool name.
    let mut odd = desired.cells[0].clone();
    odd.metadata.name = Some("cell-a-analytics-smollm2".into());
    desired.cells.push(odd);
    desired.models.iter_mut().for_each(|m| m.spec.cells.clear());
    let plan = plan(&desired, &Observed::default());
    let names: Vec<&str> = plan.pools.iter().map(|p| p.name.as_str()).collect();
    let mut unique = names.clone();
    unique.dedup();
    assert_eq!(names, unique, "every pool name once");
    assert!(plan.problems.iter().any(|p| p.reason == "NameCollision"), "{:?}", plan.problems);
}
