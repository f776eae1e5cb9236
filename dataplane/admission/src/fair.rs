//! Weighted fair queuing among the tenants of one scheduling class (one lane, one priority level).
//!
//! Deficit round robin gives each backlogged tenant `quantum × weight` tokens of credit per round
//! and serves a request once its credit covers the request's cost. Written as a clock, the same
//! rule is start-time fair queuing: every tenant has a virtual finish tag (tokens served ÷ weight)
//! and the tenant with the smallest start tag goes next, after which its tag advances by
//! `cost / weight`. That is DRR with an infinitely fine quantum: the same long-run shares, one
//! request at a time, no rounds to skip when a request is larger than a quantum.
//!
//! One refinement: a tenant that was idle keeps up to `credit` tokens (× its weight) of unused
//! share. Its start tag is `max(finish, virtual_time − credit)`, so a light tenant's burst is
//! served ahead of a backlogged heavy tenant until the burst has used the credit, instead of
//! alternating one-for-one with it. Plain DRR forgets idle credit, which doubles a light tenant's
//! burst latency under contention. The credit is bounded, so no tenant can bank an advantage.
//!
//! Within a tenant, requests leave in score order (priority, aging, deadline; see the queue).

use std::collections::{BTreeSet, HashMap};

/// Virtual-time units per token at weight 1. Weights are kept in thousandths.
const VIRTUAL_PER_TOKEN: u128 = 1_000;
/// The weight 1.0 in thousandths.
pub(crate) const UNIT_WEIGHT: u64 = 1_000;

/// One queued request. Ordered by score key, then arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Entry {
    /// The request's score (milli-points, time-invariant; lower is served first).
    pub key: i64,
    /// Arrival order, unique per queue.
    pub seq: u64,
    pub id: u64,
    /// Tokens: input + expected output.
    pub cost: u64,
}

#[derive(Debug, Default)]
struct Flow {
    entries: BTreeSet<Entry>,
    tokens: u64,
    /// Virtual time at which the tenant's service so far ends.
    finish: u128,
    weight: u64,
}

/// The tenants of one class and their queued requests.
#[derive(Debug, Default)]
pub(crate) struct FairQueue {
    virtual_time: u128,
    flows: HashMap<String, Flow>,
    /// Every queued entry, for the class's best score.
    by_score: BTreeSet<Entry>,
    tokens: u64,
}

impl FairQueue {
    pub fn len(&self) -> usize {
        self.by_score.len()
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The best-scored entry of any tenant.
    pub fn best(&self) -> Option<&Entry> {
        self.by_score.first()
    }

    /// Queues `entry` for `tenant`, whose weight (in thousandths) becomes `weight`.
    pub fn push(&mut self, tenant: &str, weight: u64, entry: Entry) {
        let flow = match self.flows.get_mut(tenant) {
            Some(flow) => flow,
            None => self.flows.entry(tenant.to_owned()).or_default(),
        };
        flow.weight = weight.max(1);
        if flow.entries.insert(entry) {
            flow.tokens = flow.tokens.saturating_add(entry.cost);
            self.by_score.insert(entry);
            self.tokens = self.tokens.saturating_add(entry.cost);
        }
    }

    /// Removes a queued entry (cancelled or expired). False if it is not queued here.
    pub fn remove(&mut self, tenant: &str, entry: &Entry) -> bool {
        let Some(flow) = self.flows.get_mut(tenant) else { return false };
        if !flow.entries.remove(entry) {
            return false;
        }
        flow.tokens = flow.tokens.saturating_sub(entry.cost);
        self.by_score.remove(entry);
        self.tokens = self.tokens.saturating_sub(entry.cost);
        true
    }

    /// The best-scored entry among the tenants not in `skip`.
    pub fn best_except(&self, skip: &[String]) -> Option<&Entry> {
        if skip.is_empty() {
            return self.best();
        }
        self.flows
            .iter()
            .filter(|(tenant, _)| !skip.contains(tenant))
            .filter_map(|(_, flow)| flow.entries.first())
            .min()
    }

    /// Takes the next entry: the best-scored entry of the tenant with the smallest start tag
    /// (earliest head on a tie), charging that tenant `cost / weight`.
    #[cfg(test)]
    pub fn pop(&mut self, credit_tokens: u64) -> Option<Entry> {
        self.pop_except(credit_tokens, &[])
    }

    /// The next entry (the best-scored entry of the tenant with the smallest start tag, earliest
    /// head on a tie) among the tenants not in `skip`, charging that tenant `cost / weight`.
    pub fn pop_except(&mut self, credit_tokens: u64, skip: &[String]) -> Option<Entry> {
        let floor = self.virtual_time.saturating_sub(u128::from(credit_tokens) * VIRTUAL_PER_TOKEN);
        let (start, _, tenant) = self
            .flows
            .iter()
            .filter(|(tenant, _)| !skip.contains(tenant))
            .filter_map(|(tenant, flow)| flow.entries.first().map(|head| (flow.finish.max(floor), head.seq, tenant)))
            .min()?;
        let tenant = tenant.clone();
        let flow = self.flows.get_mut(&tenant)?;
        let entry = flow.entries.pop_first()?;
        flow.tokens = flow.tokens.saturating_sub(entry.cost);
        flow.finish = start.saturating_add(virtual_cost(entry.cost, flow.weight));
        self.virtual_time = self.virtual_time.max(start);
        self.by_score.remove(&entry);
        self.tokens = self.tokens.saturating_sub(entry.cost);
        Some(entry)
    }

    /// Forgets idle tenants whose credit is full again: they are indistinguishable from new ones.
    pub fn prune(&mut self, credit_tokens: u64) {
        let floor = self.virtual_time.saturating_sub(u128::from(credit_tokens) * VIRTUAL_PER_TOKEN);
        self.flows.retain(|_, flow| !flow.entries.is_empty() || flow.finish > floor);
    }

    /// Tokens served in this class before a new request of `tenant` starts, if everyone keeps
    /// their fair share: the tenant's own queue, and from every other tenant at most what it is
    /// owed for the same stretch of virtual time.
    pub fn tokens_ahead(&self, tenant: &str, weight: u64) -> u64 {
        let own = self.flows.get(tenant).map_or(0, |flow| flow.tokens);
        let others = self.flows.iter().filter(|(name, _)| name.as_str() != tenant).fold(0u64, |sum, (_, flow)| {
            let owed = u128::from(own) * u128::from(flow.weight) / u128::from(weight.max(1));
            sum.saturating_add(u64::try_from(owed).unwrap_or(u64::MAX).min(flow.tokens))
        });
        own.saturating_add(others)
    }

    /// Asserts that the indexes agree with each other.
    #[cfg(test)]
    pub fn check(&self) {
        let entries: usize = self.flows.values().map(|f| f.entries.len()).sum();
        assert_eq!(entries, self.by_score.len());
        let tokens = self.flows.values().map(|f| f.tokens).fold(0u64, u64::saturating_add);
        assert_eq!(tokens, self.tokens);
        for flow in self.flows.values() {
            let sum = flow.entries.iter().map(|e| e.cost).fold(0u64, u64::saturating_add);
            assert_eq!(sum, flow.tokens);
            assert!(flow.entries.iter().all(|e| self.by_score.contains(e)));
        }
    }
}

fn virtual_cost(cost: u64, weight: u64) -> u128 {
    u128::from(cost) * VIRTUAL_PER_TOKEN * u128::from(UNIT_WEIGHT) / u128::from(weight.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, cost: u64) -> Entry {
        Entry { key: 0, seq, id: seq, cost }
    }

    #[test]
    fn backlogged_tenants_get_tokens_in_proportion_to_weight() {
        let mut q = FairQueue::default();
        for seq in 0..400 {
            q.push("one", UNIT_WEIGHT, entry(seq * 2, 100));
            q.push("three", 3 * UNIT_WEIGHT, entry(seq * 2 + 1, 100));
        }
        let mut served = HashMap::<bool, u64>::new();
        for _ in 0..200 {
            let e = q.pop(0).unwrap();
            *served.entry(e.seq % 2 == 1).or_default() += e.cost;
        }
        assert_eq!(served[&true], 3 * served[&false]);
        q.check();
    }

    #[test]
    fn an_idle_tenant_is_served_first_up_to_its_credit() {
        let mut q = FairQueue::default();
        for seq in 0..100 {
            q.push("heavy", UNIT_WEIGHT, entry(seq, 1_000));
        }
        for _ in 0..50 {
            q.pop(3_000);
        }
        for seq in 100..110 {
            q.push("light", UNIT_WEIGHT, entry(seq, 1_000));
        }
        let order: Vec<bool> = (0..8).map(|_| q.pop(3_000).unwrap().seq >= 100).collect();
        // Light catches up its credit (three requests, plus the one heavy is ahead by), then
        // the two alternate.
        assert_eq!(order, [true, true, true, true, false, true, false, true]);
    }
}
