//! Which runner serves a request: pure functions over a snapshot of the runners' load.
//!
//! 1. **Pools.** A provisioned tenant's requests go to the runners of its dedicated pool first;
//!    only when none of them is ready do they use the shared pool.
//! 2. **Cells.** In the shared pool each tenant is shuffle-sharded onto `shard_size` of the
//!    model's Cells (a stable choice from a hash of the tenant), so one noisy tenant reaches only
//!    a few Cells and two tenants rarely share all of theirs. When none of a tenant's Cells has a
//!    ready runner, any Cell is used. Within a Cell, the tenant is spread over the Cell's
//!    `shuffleShardSize` runners ranked first for it (rendezvous hashing of tenant and runner
//!    over the ready runners: when one fails, only the tenants that had it move, each to one
//!    other runner). A provisioned tenant's dedicated pool is all its own and is not sharded.
//! 3. **Prefix affinity with bounded load.** Requests carry a hash of their prompt's first
//!    tokens-worth of text (a shared system prompt). That hash is looked up on a consistent-hash
//!    ring (64 virtual nodes per runner); walking clockwise, the first runner whose load is at
//!    most `1 + BOUND_EPSILON` times the average (plus one) is the affinity choice, so one prefix
//!    keeps hitting one runner's prefix cache, and a popular prefix spills over instead of making
//!    a hot spot ("consistent hashing with bounded loads", Mirrokni et al.).
//! 4. **Power of two choices.** A second runner is drawn at random; the affinity runner wins
//!    unless its load exceeds the random one's by more than `AFFINITY_SLACK`; without a prefix, the
//!    less loaded of two random runners wins.
//!
//! Load is the router's in-flight requests on a runner plus the runner's own queue depth from
//! its Health stream; runners in CRITICAL take nothing, THROTTLE runners count double.

use std::hash::{DefaultHasher, Hash, Hasher};

use rand::Rng;

/// How far above the average load the affinity runner may be before the ring moves on.
pub const BOUND_EPSILON: f64 = 0.25;
/// How much busier than the random alternative the affinity runner may be and still win.
pub const AFFINITY_SLACK: f64 = 4.0;
const VIRTUAL_NODES: u32 = 64;

/// A runner as placement sees it.
#[derive(Clone, Debug)]
pub struct RunnerView<'a> {
    pub id: &'a str,
    pub ready: bool,
    /// Dedicated to one tenant (provisioned throughput), or shared.
    pub pool: Option<&'a str>,
    pub cell: Option<&'a str>,
    /// How many of its Cell's runners one tenant is spread over: the Cell's `shuffleShardSize`
    /// (0: all of them).
    pub cell_shard: usize,
    /// In-flight requests plus the runner's reported queue depth, already weighted by state.
    pub load: f64,
}

/// Facts about the request.
#[derive(Clone, Debug, Default)]
pub struct RequestFacts<'a> {
    pub tenant: &'a str,
    /// Hash of the prompt's leading text, when it is long enough to be worth caching.
    pub prefix: Option<u64>,
    /// How many Cells a tenant is spread over (0: all).
    pub shard_size: usize,
}

/// Hash of the leading `bytes` of a prompt, or `None` for prompts too short to matter.
pub fn prefix_key(prompt: &str, bytes: usize) -> Option<u64> {
    if prompt.len() < bytes {
        return None;
    }
    let mut end = bytes;
    while !prompt.is_char_boundary(end) {
        end -= 1;
    }
    Some(hash(&prompt[..end]))
}

fn hash(value: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// The Cells a tenant is sharded onto: a stable pseudo-random subset of `cells`.
pub fn tenant_cells<'a>(tenant: &str, cells: &[&'a str], shard_size: usize) -> Vec<&'a str> {
    if shard_size == 0 || shard_size >= cells.len() {
        return cells.to_vec();
    }
    let mut ranked: Vec<(u64, &str)> = cells.iter().map(|c| (hash((tenant, *c)), *c)).collect();
    ranked.sort_unstable();
    ranked.into_iter().take(shard_size).map(|(_, c)| c).collect()
}

/// Chooses a runner (an index into `runners`), or `None` when none is ready.
pub fn choose(runners: &[RunnerView<'_>], facts: &RequestFacts<'_>, rng: &mut impl Rng) -> Option<usize> {
    let ready: Vec<usize> = (0..runners.len()).filter(|&i| runners[i].ready).collect();
    // Dedicated pool first (all the tenant's own: not sharded), else the shared pool.
    let dedicated: Vec<usize> = ready.iter().copied().filter(|&i| runners[i].pool == Some(facts.tenant)).collect();
    if !dedicated.is_empty() {
        return Some(pick(runners, &dedicated, facts.prefix, rng));
    }
    let shared: Vec<usize> = ready.into_iter().filter(|&i| runners[i].pool.is_none()).collect();
    if shared.is_empty() {
        return None;
    }
    let candidates = tenant_shard(runners, shared, facts);
    Some(pick(runners, &candidates, facts.prefix, rng))
}

/// The runners of the shared `pool` a tenant may use: those in its Cells, and of each Cell the
/// `cell_shard` ranked first for it.
fn tenant_shard(runners: &[RunnerView<'_>], pool: Vec<usize>, facts: &RequestFacts<'_>) -> Vec<usize> {
    let mut cells: Vec<&str> = pool.iter().filter_map(|&i| runners[i].cell).collect();
    cells.sort_unstable();
    cells.dedup();
    let in_cells = if cells.len() > 1 {
        let mine = tenant_cells(facts.tenant, &cells, facts.shard_size);
        let sharded: Vec<usize> =
            pool.iter().copied().filter(|&i| runners[i].cell.is_some_and(|c| mine.contains(&c))).collect();
        if sharded.is_empty() { pool } else { sharded }
    } else {
        pool
    };
    // Within each Cell: the runners with the highest hash of (tenant, runner).
    let mut ranked: Vec<(Option<&str>, u64, usize)> =
        in_cells.iter().map(|&i| (runners[i].cell, hash((facts.tenant, runners[i].id)), i)).collect();
    ranked.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut kept = Vec::with_capacity(ranked.len());
    let mut taken = 0;
    for (n, &(cell, _, i)) in ranked.iter().enumerate() {
        taken = if n > 0 && ranked[n - 1].0 == cell { taken + 1 } else { 0 };
        let shard = runners[i].cell_shard;
        if cell.is_none() || shard == 0 || taken < shard {
            kept.push(i);
        }
    }
    kept
}

fn pick(runners: &[RunnerView<'_>], candidates: &[usize], prefix: Option<u64>, rng: &mut impl Rng) -> usize {
    if candidates.len() == 1 {
        return candidates[0];
    }
    let random = candidates[rng.random_range(0..candidates.len())];
    match prefix {
        Some(key) => {
            let affinity = bounded_ring_owner(runners, candidates, key);
            if runners[affinity].load <= runners[random].load + AFFINITY_SLACK { affinity } else { random }
        }
        None => {
            let mut other = candidates[rng.random_range(0..candidates.len() - 1)];
            if other == random {
                other = candidates[candidates.len() - 1];
            }
            if runners[other].load < runners[random].load { other } else { random }
        }
    }
}

/// The first runner clockwise from `key` on the consistent-hash ring whose load is within the
/// bound.
fn bounded_ring_owner(runners: &[RunnerView<'_>], candidates: &[usize], key: u64) -> usize {
    let mut ring: Vec<(u64, usize)> =
        candidates.iter().flat_map(|&i| (0..VIRTUAL_NODES).map(move |v| (hash((runners[i].id, v)), i))).collect();
    ring.sort_unstable();
    let total: f64 = candidates.iter().map(|&i| runners[i].load).sum();
    let bound = (1.0 + BOUND_EPSILON) * (total + 1.0) / candidates.len() as f64;
    let start = ring.partition_point(|(h, _)| *h < key);
    let walk = ring[start..].iter().chain(&ring[..start]);
    let mut first = None;
    for &(_, i) in walk {
        first.get_or_insert(i);
        if runners[i].load <= bound {
            return i;
        }
    }
    first.unwrap_or(candidates[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn runner(id: &str, load: f64) -> RunnerView<'_> {
        RunnerView { id, ready: true, pool: None, cell: None, cell_shard: 0, load }
    }

    #[test]
    fn the_same_prefix_keeps_its_runner_until_it_is_overloaded() {
        let ids: Vec<String> = (0..8).map(|i| format!("runner-{i}")).collect();
        let mut runners: Vec<RunnerView> = ids.iter().map(|id| runner(id, 1.0)).collect();
        let mut rng = StdRng::seed_from_u64(7);
        let facts = RequestFacts { tenant: "t", prefix: prefix_key(&"s".repeat(600), 512), shard_size: 0 };
        let first = choose(&runners, &facts, &mut rng).unwrap();
        for _ in 0..100 {
            assert_eq!(choose(&runners, &facts, &mut rng), Some(first));
        }
        // Overload it: the prefix moves on instead of piling up.
        runners[first].load = 40.0;
        let moved = choose(&runners, &facts, &mut rng).unwrap();
        assert_ne!(moved, first);
    }

    #[test]
    fn different_prefixes_spread_over_runners() {
        let ids: Vec<String> = (0..4).map(|i| format!("runner-{i}")).collect();
        let runners: Vec<RunnerView> = ids.iter().map(|id| runner(id, 0.0)).collect();
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0; 4];
        for p in 0..400 {
            let facts = RequestFacts { tenant: "t", prefix: Some(hash(p)), shard_size: 0 };
            counts[choose(&runners, &facts, &mut rng).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 40), "{counts:?}");
    }

    #[test]
    fn two_choices_prefers_the_less_loaded() {
        let runners = vec![runner("a", 10.0), runner("b", 0.0)];
        let mut rng = StdRng::seed_from_u64(3);
        let facts = RequestFacts::default();
        for _ in 0..50 {
            assert_eq!(choose(&runners, &facts, &mut rng), Some(1));
        }
    }

    #[test]
    fn dedicated_pools_come_first_and_unready_runners_never() {
        let mut runners = vec![runner("shared", 0.0), runner("mine", 50.0), runner("theirs", 0.0)];
        runners[1].pool = Some("analytics");
        runners[2].pool = Some("other");
        let mut rng = StdRng::seed_from_u64(3);
        let facts = RequestFacts { tenant: "analytics", ..Default::default() };
        assert_eq!(choose(&runners, &facts, &mut rng), Some(1));
        runners[1].ready = false;
        assert_eq!(choose(&runners, &facts, &mut rng), Some(0));
        let facts = RequestFacts { tenant: "web", ..Default::default() };
        assert_eq!(choose(&runners, &facts, &mut rng), Some(0));
        runners[0].ready = false;
        assert_eq!(choose(&runners, &facts, &mut rng), None);
    }

    #[test]
    fn tenants_are_shuffle_sharded_onto_cells() {
        let cells = ["a", "b", "c", "d", "e", "f"];
        let mine = tenant_cells("acme", &cells, 2);
        assert_eq!(mine.len(), 2);
        assert_eq!(mine, tenant_cells("acme", &cells, 2), "stable");
        let overlap_all = (0..50).filter(|t| tenant_cells(&format!("t{t}"), &cells, 2) == mine).count();
        assert!(overlap_all < 10, "few tenants share both cells: {overlap_all}");
        let ids: Vec<String> = cells.iter().map(|c| format!("r-{c}")).collect();
        let runners: Vec<RunnerView> = ids
            .iter()
            .zip(cells)
            .map(|(id, c)| RunnerView { id, ready: true, pool: None, cell: Some(c), cell_shard: 0, load: 0.0 })
            .collect();
        let mut rng = StdRng::seed_from_u64(9);
        let facts = RequestFacts { tenant: "acme", prefix: None, shard_size: 2 };
        for _ in 0..50 {
            let i = choose(&runners, &facts, &mut rng).unwrap();
            assert!(mine.contains(&cells[i]));
        }
    }

    /// Six shared runners in one Cell whose `shuffleShardSize` is 2.
    fn one_cell_of_six(ids: &[String]) -> Vec<RunnerView<'_>> {
        ids.iter()
            .map(|id| RunnerView { id, ready: true, pool: None, cell: Some("a"), cell_shard: 2, load: 0.0 })
            .collect()
    }

    fn used_by(runners: &[RunnerView<'_>], tenant: &str, rng: &mut StdRng) -> BTreeSet<usize> {
        let facts = RequestFacts { tenant, prefix: None, shard_size: 2 };
        (0..200).map(|_| choose(runners, &facts, rng).unwrap()).collect()
    }

    #[test]
    fn within_a_cell_a_tenant_uses_its_shard_of_runners_and_loses_only_a_failed_one() {
        let ids: Vec<String> = (0..6).map(|i| format!("10.0.0.{i}:50051")).collect();
        let mut runners = one_cell_of_six(&ids);
        let mut rng = StdRng::seed_from_u64(5);
        let mine = used_by(&runners, "acme", &mut rng);
        assert_eq!(mine.len(), 2, "{mine:?}");
        assert_eq!(used_by(&runners, "acme", &mut rng), mine, "stable");
        let same_pair = (0..60).filter(|t| used_by(&runners, &format!("t{t}"), &mut rng) == mine).count();
        assert!(same_pair < 15, "tenants spread over different pairs: {same_pair} of 60 share acme's");
        // One of its runners fails: it keeps the other and gains exactly one.
        let lost = *mine.iter().next().unwrap();
        runners[lost].ready = false;
        let now = used_by(&runners, "acme", &mut rng);
        assert_eq!(now.len(), 2);
        assert_eq!(now.intersection(&mine).count(), 1, "{mine:?} became {now:?}");
        assert!(!now.contains(&lost));
        // 0: no shard, every runner.
        runners.iter_mut().for_each(|r| (r.cell_shard, r.ready) = (0, true));
        assert_eq!(used_by(&runners, "acme", &mut rng).len(), 6);
    }

    #[test]
    fn a_dedicated_pool_is_neither_cell_nor_runner_sharded() {
        let ids: Vec<String> = (0..6).map(|i| format!("10.0.1.{i}:50051")).collect();
        let cells = ["a", "a", "b", "b", "c", "c"];
        let runners: Vec<RunnerView> = ids
            .iter()
            .zip(cells)
            .map(|(id, c)| RunnerView { id, ready: true, pool: Some("acme"), cell: Some(c), cell_shard: 1, load: 0.0 })
            .collect();
        let mut rng = StdRng::seed_from_u64(6);
        assert_eq!(used_by(&runners, "acme", &mut rng).len(), 6);
    }

    #[test]
    fn short_prompts_have_no_prefix_key_and_multibyte_text_is_cut_safely() {
        assert_eq!(prefix_key("short", 512), None);
        assert!(prefix_key(&"é".repeat(300), 511).is_some());
    }
}
