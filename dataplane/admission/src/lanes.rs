//! Size-class lanes: requests are classified by estimated cost so that a 100K-token prompt never
//! sits in front of a stream of 200-token ones. Each lane owns a share of the model's slots; a
//! request whose lane is full may overflow into a larger lane at a lower priority (the queue does
//! that, see [`crate::State`]).
//!
//! Cost = input tokens + 10 × expected output tokens, because a generated token costs a full
//! forward step while prompt tokens are processed in parallel. Small is under 7,000 (about 2K
//! input and 500 output), medium under 25,000, large above. Slots are split 50/35/15%.

use std::fmt;

/// Cost below which a request is small.
pub const SMALL_MAX_COST: u64 = 7_000;
/// Cost below which a request is medium; at or above it, large.
pub const MEDIUM_MAX_COST: u64 = 25_000;
/// How much more a generated token costs than a prompt token, for classification.
pub const OUTPUT_COST_MULTIPLIER: u64 = 10;
/// Percent of the model's slots each lane owns, small to large.
pub const LANE_SHARE_PERCENT: [u64; 3] = [50, 35, 15];

/// A size class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// Estimated cost under 7,000: chat turns, short completions.
    Small,
    /// Estimated cost 7,000–25,000.
    Medium,
    /// Estimated cost 25,000 and above: long documents, long generations.
    Large,
}

impl Lane {
    /// Every lane, smallest first.
    pub const ALL: [Lane; 3] = [Lane::Small, Lane::Medium, Lane::Large];

    /// 0, 1 or 2.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The next larger lane, where this lane's requests overflow to.
    pub fn larger(self) -> Option<Lane> {
        match self {
            Lane::Small => Some(Lane::Medium),
            Lane::Medium => Some(Lane::Large),
            Lane::Large => None,
        }
    }

    /// A stable lower-case name, for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Lane::Small => "small",
            Lane::Medium => "medium",
            Lane::Large => "large",
        }
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Input tokens + 10 × expected output tokens, saturating.
pub fn estimated_cost(input_tokens: u64, expected_output_tokens: u64) -> u64 {
    input_tokens.saturating_add(expected_output_tokens.saturating_mul(OUTPUT_COST_MULTIPLIER))
}

/// The lane a request belongs to.
pub fn classify(input_tokens: u64, expected_output_tokens: u64) -> Lane {
    match estimated_cost(input_tokens, expected_output_tokens) {
        cost if cost < SMALL_MAX_COST => Lane::Small,
        cost if cost < MEDIUM_MAX_COST => Lane::Medium,
        _ => Lane::Large,
    }
}

/// Splits `slots` among the lanes, small to large: 50/35/15% by largest remainder, every lane at
/// least one slot once there are three. With fewer, isolation is impossible and the slots go to
/// the larger lanes (`[0, 0, 1]`, `[1, 0, 1]`) so that every request can reach one by overflowing.
pub fn lane_slots(slots: usize) -> [usize; 3] {
    match slots {
        0 => return [0, 0, 0],
        1 => return [0, 0, 1],
        2 => return [1, 0, 1],
        _ => {}
    }
    let total = slots as u128;
    let mut split = [0usize; 3];
    let mut remainders = [(0u128, 0usize); 3];
    for (i, share) in LANE_SHARE_PERCENT.iter().enumerate() {
        let exact = total * u128::from(*share);
        split[i] = (exact / 100) as usize;
        remainders[i] = (exact % 100, i);
    }
    // Largest remainders first; on a tie the smaller lane wins.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let left = slots - split.iter().sum::<usize>();
    for &(_, i) in remainders.iter().take(left) {
        split[i] += 1;
    }
    for i in 0..3 {
        if split[i] == 0 {
            let richest = (0..3).max_by_key(|&j| (split[j], std::cmp::Reverse(j))).unwrap_or(0);
            split[richest] -= 1;
            split[i] = 1;
        }
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_boundaries_follow_the_design() {
        assert_eq!(classify(0, 0), Lane::Small);
        assert_eq!(classify(6_999, 0), Lane::Small);
        assert_eq!(classify(7_000, 0), Lane::Medium);
        assert_eq!(classify(1_999, 500), Lane::Small);
        assert_eq!(classify(2_000, 500), Lane::Medium);
        assert_eq!(classify(0, 700), Lane::Medium);
        assert_eq!(classify(24_999, 0), Lane::Medium);
        assert_eq!(classify(25_000, 0), Lane::Large);
        assert_eq!(classify(0, 2_500), Lane::Large);
        assert_eq!(classify(u64::MAX, u64::MAX), Lane::Large);
    }

    #[test]
    fn slots_split_fifty_thirty_five_fifteen() {
        assert_eq!(lane_slots(0), [0, 0, 0]);
        assert_eq!(lane_slots(1), [0, 0, 1]);
        assert_eq!(lane_slots(2), [1, 0, 1]);
        assert_eq!(lane_slots(3), [1, 1, 1]);
        assert_eq!(lane_slots(4), [2, 1, 1]);
        assert_eq!(lane_slots(10), [5, 4, 1]);
        assert_eq!(lane_slots(20), [10, 7, 3]);
        assert_eq!(lane_slots(100), [50, 35, 15]);
    }

    #[test]
    fn every_slot_is_assigned_and_every_lane_gets_one_from_three_slots() {
        for slots in (0..2_000).chain([usize::MAX / 2, usize::MAX]) {
            let split = lane_slots(slots);
            assert_eq!(split.iter().fold(0usize, |a, b| a.saturating_add(*b)), slots, "{slots}");
            if slots >= 3 {
                assert!(split.iter().all(|&s| s >= 1), "{slots}: {split:?}");
                assert!(split[0] >= split[2], "{slots}: {split:?}");
            }
        }
    }

    #[test]
    fn larger_walks_up_and_stops() {
        assert_eq!(Lane::Small.larger(), Some(Lane::Medium));
        assert_eq!(Lane::Medium.larger(), Some(Lane::Large));
        assert_eq!(Lane::Large.larger(), None);
    }
}
