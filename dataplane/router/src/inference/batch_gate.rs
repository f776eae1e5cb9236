//! Which batch requests may start now, by the job's tier (pure). Batch work never draws on a
//! tenant's token buckets; instead it takes the capacity real-time traffic leaves:
//!
//! | tier | runners healthy | runners degraded or throttling | no healthy runner |
//! |---|---|---|---|
//! | `STANDARD` | starts (queued at the lowest priority) | a floor: a quarter of the slots, at least one | waits |
//! | `ECONOMY`, `SPOT` | starts only while the model is idle: nothing queued, real-time requests on at most half the slots | waits | waits |
//!
//! "Waits" is a 503 with a retry hint: the worker backs off and asks again (it never fails a
//! record for it).

use mantle_admission::LoadState as Load;
use mantle_crds::BatchTier;

/// The model's shared pool as the gate sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolNow {
    pub load: Load,
    /// Slots of its ready runners.
    pub capacity: usize,
    /// Requests running, batch ones included, and waiting.
    pub in_flight: usize,
    pub queued: usize,
    /// Batch requests running.
    pub batch_in_flight: usize,
}

/// `Err` with why the request waits.
pub fn admits(tier: BatchTier, now: PoolNow) -> Result<(), &'static str> {
    let real_time = now.in_flight.saturating_sub(now.batch_in_flight);
    match (tier, now.load) {
        (_, Load::Critical) => Err("no runner of the model is healthy; batch work waits"),
        (BatchTier::Standard, Load::Healthy) => Ok(()),
        (BatchTier::Standard, _) if now.batch_in_flight < (now.capacity / 4).max(1) => Ok(()),
        (BatchTier::Standard, _) => Err("the model's runners are degraded; batch work keeps to its floor"),
        (_, Load::Healthy) if now.queued == 0 && real_time * 2 <= now.capacity => Ok(()),
        (_, Load::Healthy) => Err("ECONOMY and SPOT batch work waits for idle capacity"),
        _ => Err("the model's runners are degraded; ECONOMY and SPOT batch work waits"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(load: Load, in_flight: usize, queued: usize, batch: usize) -> PoolNow {
        PoolNow { load, capacity: 16, in_flight, queued, batch_in_flight: batch }
    }

    #[test]
    fn standard_takes_what_is_left_and_keeps_a_floor_when_runners_struggle() {
        assert!(admits(BatchTier::Standard, pool(Load::Healthy, 16, 10, 8)).is_ok());
        assert!(admits(BatchTier::Standard, pool(Load::Degraded, 16, 0, 3)).is_ok(), "under the floor of 4");
        assert!(admits(BatchTier::Standard, pool(Load::Throttle, 16, 0, 4)).is_err(), "at the floor");
        assert!(admits(BatchTier::Standard, pool(Load::Critical, 0, 0, 0)).is_err());
    }

    #[test]
    fn economy_and_spot_wait_for_idle_capacity() {
        for tier in [BatchTier::Economy, BatchTier::Spot] {
            assert!(admits(tier, pool(Load::Healthy, 10, 0, 6)).is_ok(), "4 real-time requests on 16 slots: idle");
            assert!(admits(tier, pool(Load::Healthy, 9, 0, 0)).is_err(), "real-time traffic on over half the slots");
            assert!(admits(tier, pool(Load::Healthy, 2, 1, 0)).is_err(), "something is queued");
            assert!(admits(tier, pool(Load::Degraded, 0, 0, 0)).is_err(), "degraded runners");
        }
    }
}
