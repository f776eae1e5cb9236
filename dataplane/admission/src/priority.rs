//! Request priority levels, the design's P0–P3. Lower levels are served first; the queue turns a
//! level into a numeric score (see [`crate::priority_score`]).

/// How urgently a request should be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    /// P0: real-time and customer-facing (chat). Target queue wait under 500 ms.
    Critical,
    /// P1: interactive applications. Target queue wait under 2 s.
    High,
    /// P2: background processing, best effort.
    #[default]
    Normal,
    /// P3: batch and asynchronous jobs; may wait a long time, but aging bounds how long.
    Low,
}

impl Priority {
    /// Every level, most urgent first.
    pub const ALL: [Priority; 4] = [Priority::Critical, Priority::High, Priority::Normal, Priority::Low];

    /// 0 for `Critical` up to 3 for `Low`.
    pub fn level(self) -> u8 {
        self as u8
    }

    /// The priority of a numeric level; anything above 3 is `Low`.
    pub fn from_level(level: u8) -> Priority {
        match level {
            0 => Priority::Critical,
            1 => Priority::High,
            2 => Priority::Normal,
            _ => Priority::Low,
        }
    }

    /// A stable lower-case name, for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_trip_and_saturate_at_low() {
        for p in Priority::ALL {
            assert_eq!(Priority::from_level(p.level()), p);
        }
        assert_eq!(Priority::from_level(200), Priority::Low);
        assert!(Priority::Critical < Priority::Low);
    }
}
