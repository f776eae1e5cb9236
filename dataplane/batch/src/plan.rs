//! Cutting the input into shards (pure): records are fed one at a time, in input order, and
//! shards of about `target_tokens` tokens (at most `max_records` records) come out. Nothing holds
//! the input: a shard is a list of byte ranges of one input file.
//!
//! Records whose prompts start alike (the same [`prefix_key`](crate::record::prefix_key)) go to
//! the same open shard, so a shard's records share the runners' prefix cache. At most
//! [`OPEN_GROUPS`] groups are open at once; records of further prefixes share one mixed group,
//! so many distinct prefixes never make many small shards.

use serde::{Deserialize, Serialize};

/// Prefix groups open at once, besides the mixed one.
pub const OPEN_GROUPS: usize = 16;

/// A run of consecutive lines of one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lines {
    /// Byte range in the file, newlines included.
    pub start: u64,
    pub end: u64,
    /// The first line's number (0-based) and how many lines.
    pub first_line: u64,
    pub count: u64,
}

/// A unit of work: records of one input file, run and committed together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shard {
    pub id: u32,
    /// The input file, relative to the input prefix.
    pub file: String,
    pub lines: Vec<Lines>,
    pub records: u64,
    /// Estimated prompt tokens.
    pub tokens: u64,
    /// Line numbers of records whose recordId appeared earlier in the job (error records).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub duplicates: Vec<u64>,
}

impl Shard {
    fn new(file: &str) -> Self {
        Shard { id: 0, file: file.to_string(), lines: Vec::new(), records: 0, tokens: 0, duplicates: Vec::new() }
    }

    fn push(&mut self, line: u64, start: u64, end: u64, tokens: u64) {
        match self.lines.last_mut() {
            Some(run) if run.end == start && run.first_line + run.count == line => {
                run.end = end;
                run.count += 1;
            }
            _ => self.lines.push(Lines { start, end, first_line: line, count: 1 }),
        }
        self.records += 1;
        self.tokens += tokens;
    }
}

/// One input line as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub line: u64,
    pub start: u64,
    pub end: u64,
    pub tokens: u64,
    /// The record's prefix group; `None` for a line that is not a record (it still needs a
    /// shard: its error record is written there).
    pub prefix: Option<u64>,
    pub duplicate: bool,
}

/// Cuts shards from records fed in order.
pub struct Cutter {
    target_tokens: u64,
    max_records: u64,
    /// Open groups by prefix key, oldest first; the mixed group is `None`.
    open: Vec<(Option<u64>, Shard)>,
    file: String,
    done: Vec<Shard>,
    next_id: u32,
}

impl Cutter {
    pub fn new(target_tokens: u64, max_records: u64) -> Self {
        Cutter {
            target_tokens: target_tokens.max(1),
            max_records: max_records.max(1),
            open: Vec::new(),
            file: String::new(),
            done: Vec::new(),
            next_id: 0,
        }
    }

    /// Starts the next input file (the open shards of the last one are closed).
    pub fn start_file(&mut self, file: &str) {
        self.close_all();
        self.file = file.to_string();
    }

    pub fn push(&mut self, seen: Seen) {
        let group = match seen.prefix {
            Some(key) if self.open.iter().any(|(k, _)| *k == Some(key)) => Some(key),
            Some(key) if self.open.iter().filter(|(k, _)| k.is_some()).count() < OPEN_GROUPS => Some(key),
            _ => None,
        };
        let index = match self.open.iter().position(|(k, _)| *k == group) {
            Some(i) => i,
            None => {
                self.open.push((group, Shard::new(&self.file)));
                self.open.len() - 1
            }
        };
        let shard = &mut self.open[index].1;
        // A record that would overfill a shard starts the next one (a shard is never empty).
        if shard.records > 0 && shard.tokens + seen.tokens > self.target_tokens {
            self.close(index);
            self.open.push((group, Shard::new(&self.file)));
        }
        let index = self.open.iter().position(|(k, _)| *k == group).expect("the group is open");
        let shard = &mut self.open[index].1;
        shard.push(seen.line, seen.start, seen.end, seen.tokens);
        if seen.duplicate {
            shard.duplicates.push(seen.line);
        }
        if shard.records >= self.max_records || shard.tokens >= self.target_tokens {
            self.close(index);
        }
    }

    /// Shards closed so far, in the order they were cut (ids count up from 0).
    pub fn take(&mut self) -> Vec<Shard> {
        std::mem::take(&mut self.done)
    }

    /// Closes every open shard and returns those not yet taken.
    pub fn finish(mut self) -> Vec<Shard> {
        self.close_all();
        self.done
    }

    fn close(&mut self, index: usize) {
        let (_, mut shard) = self.open.remove(index);
        shard.id = self.next_id;
        self.next_id += 1;
        self.done.push(shard);
    }

    fn close_all(&mut self) {
        while !self.open.is_empty() {
            self.close(0);
        }
    }
}

/// Estimates a prompt's tokens from its bytes, calibrated on a sample counted by the model's
/// own tokenizer (reading every record's tokens exactly would cost as much as a model pass over
/// the whole input; exact counts come back with each answer).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenEstimate {
    pub bytes_per_token: f64,
}

impl TokenEstimate {
    /// From (bytes, tokens) samples; 4 bytes a token when there are none.
    pub fn calibrate(samples: &[(u64, u64)]) -> Self {
        let (bytes, tokens) = samples.iter().fold((0u64, 0u64), |(b, t), (sb, st)| (b + sb, t + st));
        let bytes_per_token = if tokens == 0 { 4.0 } else { (bytes as f64 / tokens as f64).max(0.5) };
        TokenEstimate { bytes_per_token }
    }

    pub fn tokens(&self, bytes: u64) -> u64 {
        ((bytes as f64 / self.bytes_per_token).ceil() as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(cutter: &mut Cutter, records: &[(u64, Option<u64>)]) {
        let mut offset = 0;
        for (line, (tokens, prefix)) in records.iter().enumerate() {
            let len = 10;
            cutter.push(Seen {
                line: line as u64,
                start: offset,
                end: offset + len,
                tokens: *tokens,
                prefix: *prefix,
                duplicate: false,
            });
            offset += len;
        }
    }

    #[test]
    fn shards_hold_about_the_target_tokens_and_never_more_than_max_records() {
        let mut c = Cutter::new(100, 1000);
        c.start_file("a.jsonl");
        feed(&mut c, &[(40, Some(1)); 10]);
        let shards = c.finish();
        assert_eq!(shards.iter().map(|s| s.records).collect::<Vec<_>>(), [2, 2, 2, 2, 2]);
        assert!(shards.iter().all(|s| s.tokens <= 100));
        // Contiguous lines make one range.
        assert_eq!(shards[0].lines, [Lines { start: 0, end: 20, first_line: 0, count: 2 }]);
        assert_eq!(shards.iter().map(|s| s.id).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);

        let mut c = Cutter::new(1_000_000, 3);
        c.start_file("a.jsonl");
        feed(&mut c, &[(1, Some(1)); 7]);
        assert_eq!(c.finish().iter().map(|s| s.records).collect::<Vec<_>>(), [3, 3, 1]);
    }

    #[test]
    fn a_record_over_the_target_gets_a_shard_of_its_own() {
        let mut c = Cutter::new(100, 1000);
        c.start_file("a.jsonl");
        feed(&mut c, &[(30, Some(1)), (500, Some(1)), (30, Some(1))]);
        let shards = c.finish();
        assert_eq!(shards.iter().map(|s| s.tokens).collect::<Vec<_>>(), [30, 500, 30]);
    }

    #[test]
    fn records_with_a_shared_prefix_stay_together_and_every_record_lands_once() {
        let mut c = Cutter::new(1000, 1000);
        c.start_file("a.jsonl");
        // Two interleaved prompt families.
        let records: Vec<_> = (0..20).map(|i| (10, Some(i % 2))).collect();
        feed(&mut c, &records);
        let shards = c.finish();
        assert_eq!(shards.len(), 2);
        for shard in &shards {
            let lines: Vec<u64> = shard.lines.iter().flat_map(|r| r.first_line..r.first_line + r.count).collect();
            assert!(lines.iter().all(|l| l % 2 == lines[0] % 2), "{lines:?}");
        }
        let mut all: Vec<u64> =
            shards.iter().flat_map(|s| s.lines.iter().flat_map(|r| r.first_line..r.first_line + r.count)).collect();
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn many_distinct_prefixes_share_the_mixed_group_instead_of_making_tiny_shards() {
        let mut c = Cutter::new(1000, 1000);
        c.start_file("a.jsonl");
        let records: Vec<_> = (0..200).map(|i| (1, Some(i))).collect();
        feed(&mut c, &records);
        let shards = c.finish();
        assert_eq!(shards.len(), OPEN_GROUPS + 1);
        assert_eq!(shards.iter().map(|s| s.records).sum::<u64>(), 200);
    }

    #[test]
    fn shards_never_span_files_and_cutting_is_deterministic() {
        let run = || {
            let mut c = Cutter::new(50, 1000);
            for file in ["a.jsonl", "b.jsonl"] {
                c.start_file(file);
                feed(&mut c, &[(20, Some(1)), (20, None), (20, Some(1)), (20, Some(2))]);
            }
            c.finish()
        };
        let shards = run();
        assert_eq!(shards, run());
        for s in &shards {
            assert!(s.file == "a.jsonl" || s.file == "b.jsonl");
        }
        assert_eq!(shards.iter().filter(|s| s.file == "a.jsonl").map(|s| s.records).sum::<u64>(), 4);
    }

    #[test]
    fn the_estimate_is_calibrated_on_samples() {
        assert_eq!(TokenEstimate::calibrate(&[]).tokens(400), 100);
        let e = TokenEstimate::calibrate(&[(300, 100), (100, 100)]);
        assert_eq!(e.bytes_per_token, 2.0);
        assert_eq!(e.tokens(10), 5);
        assert_eq!(e.tokens(0), 1);
    }
}
