//! Causal attention of one token's query heads over its sequence's cached keys and values.
//!
//! A task is one token, one KV head with the query heads that share it (grouped-query
//! attention, so each cached key and value is read once per task), and one span of at most
//! [`SPAN`] cached positions: a long context is split so that a single sequence's attention
//! still spreads over every thread. Each span's softmax is normalised on its own and
//! [`merge`] combines the spans with their maxima and sums. The split depends only on the
//! sequence's own length, never on what it is batched with, so its results do not either.
//! The cache is read a block at a time: the positions of a block are rows of one contiguous
//! slice.

use half::slice::HalfFloatSliceExt;

use crate::kv_cache::KvCache;

/// Cached positions per task at most.
pub const SPAN: usize = 256;

/// One task: the query heads that share one KV head, for one token, over a span of positions.
pub struct Head<'a> {
    pub layer: usize,
    pub blocks: &'a [u32],
    /// The group's query heads, `head_dim` values each.
    pub queries: &'a [f32],
    /// The KV head.
    pub kv_head: usize,
    /// The cached positions this task covers (of those the token attends to, its own included).
    pub span: std::ops::Range<usize>,
    pub scale: f32,
}

/// Reused buffers of one attention worker.
#[derive(Default)]
pub struct AttendScratch {
    /// `scores[h * positions + p]`.
    scores: Vec<f32>,
    /// Cached keys or values converted to f32.
    kv: Vec<f32>,
}

impl AttendScratch {
    /// The scores of `heads` rows of `positions`, and a buffer of `kv` converted values.
    fn prepare(&mut self, heads: usize, positions: usize, kv: usize) -> (&mut [f32], &mut [f32]) {
        self.scores.clear();
        self.scores.resize(heads * positions, 0.0);
        self.kv.resize(kv, 0.0);
        (&mut self.scores, &mut self.kv)
    }
}

/// Whether [`attend`]'s vectorised path can run here (AVX2, FMA and F16C).
pub fn wide_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::quant::x86_supported();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A span's softmax statistics for one query head: the largest score and the sum of
/// `exp(score - max)` over the span.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpanStats {
    pub max: f32,
    pub sum: f32,
}

/// Softmax attention of `head.queries` over the span's cached positions, into `out` (one
/// `head_dim` row per query head) and `stats` (one per query head); `wide`: as
/// [`wide_supported`] says.
pub fn attend(
    head: &Head<'_>,
    cache: &KvCache,
    scratch: &mut AttendScratch,
    out: &mut [f32],
    stats: &mut [SpanStats],
    wide: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if wide && cache.head_dim().is_multiple_of(8) {
        // SAFETY: the caller found AVX2, FMA and F16C; `head_dim` is a multiple of 8.
        return unsafe { x86::attend(head, cache, scratch, out, stats) };
    }
    let _ = wide;
    attend_portable(head, cache, scratch, out, stats);
}

/// Combines the outputs of consecutive spans of one task into `out`: `spans` holds each span's
/// `out.len()` values and `stats` its per-query-head statistics, span after span. Each span
/// weighs `sum × exp(max - overall max)` per query head.
pub fn merge(spans: &[f32], stats: &[SpanStats], out: &mut [f32]) {
    let width = out.len();
    if spans.len() == width {
        return out.copy_from_slice(spans);
    }
    let heads = stats.len() / (spans.len() / width);
    let hd = width / heads;
    for (h, acc) in out.chunks_exact_mut(hd).enumerate() {
        let head_stats = || stats.iter().skip(h).step_by(heads);
        let max = head_stats().fold(f32::NEG_INFINITY, |m, s| m.max(s.max));
        let total: f32 = head_stats().map(|s| s.sum * (s.max - max).exp()).sum();
        acc.fill(0.0);
        for (span, s) in spans.chunks_exact(width).zip(head_stats()) {
            let w = s.sum * (s.max - max).exp() / total;
            for (a, v) in acc.iter_mut().zip(&span[h * hd..(h + 1) * hd]) {
                *a += w * v;
            }
        }
    }
}

/// Runs of up to 8 positions of the span that lie in one block: (position, count, block, slot).
fn runs(head: &Head<'_>, block_size: usize) -> impl Iterator<Item = (usize, usize, u32, usize)> {
    let (span, blocks) = (head.span.clone(), head.blocks);
    let mut p = span.start;
    std::iter::from_fn(move || {
        if p >= span.end {
            return None;
        }
        let slot = p % block_size;
        let count = 8.min(block_size - slot).min(span.end - p);
        let run = (p, count, blocks[p / block_size], slot);
        p += count;
        Some(run)
    })
}

fn attend_portable(
    head: &Head<'_>,
    cache: &KvCache,
    scratch: &mut AttendScratch,
    out: &mut [f32],
    stats: &mut [SpanStats],
) {
    let Head { layer, queries, kv_head, ref span, scale, .. } = *head;
    let (hd, positions) = (cache.head_dim(), span.len());
    let (scores, buf) = scratch.prepare(queries.len() / hd, positions, hd);
    let range = |slot: usize| slot * hd..(slot + 1) * hd;
    for (p, count, block, slot) in runs(head, cache.block_size()) {
        let keys = cache.head(layer, block, kv_head).0;
        for i in 0..count {
            keys[range(slot + i)].convert_to_f32_slice(buf);
            for (h, query) in queries.chunks_exact(hd).enumerate() {
                scores[h * positions + p - span.start + i] = dot(query, buf) * scale;
            }
        }
    }
    for (row, stats) in scores.chunks_exact_mut(positions).zip(stats.iter_mut()) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.iter_mut().for_each(|v| *v = (*v - max).exp());
        let sum = row.iter().sum::<f32>();
        row.iter_mut().for_each(|v| *v *= 1.0 / sum);
        *stats = SpanStats { max, sum };
    }
    out.fill(0.0);
    for (p, count, block, slot) in runs(head, cache.block_size()) {
        let values = cache.head(layer, block, kv_head).1;
        for i in 0..count {
            values[range(slot + i)].convert_to_f32_slice(buf);
            for (h, acc) in out.chunks_exact_mut(hd).enumerate() {
                let w = scores[h * positions + p - span.start + i];
                for (a, v) in acc.iter_mut().zip(buf.iter()) {
                    *a += w * v;
                }
            }
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorise the loop.
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a.chunks_exact(8).remainder().iter().zip(b.chunks_exact(8).remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! [`super::attend`] for AVX2, FMA and F16C. Per run of 8 positions, their keys (later their
    //! values) are converted to f32 once and used by every query head of the group; the 8 scores
    //! of a head are reduced together (one horizontal reduction per 8 positions, not one per
    //! position); softmax's exponentials and the weighted sum of values run 8 lanes wide. Heads
    //! 64 wide (SmolLM2's) take AVX-512 paths for the scores and the values where the CPU has it
    //! (`MANTLE_KERNELS=avx2` keeps them on AVX2).
    use std::arch::x86_64::*;

    use super::{AttendScratch, Head, SpanStats, dot, runs};
    use crate::kv_cache::KvCache;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend(
        head: &Head<'_>,
        cache: &KvCache,
        scratch: &mut AttendScratch,
        out: &mut [f32],
        stats: &mut [SpanStats],
    ) {
        let Head { layer, queries, kv_head, ref span, scale, .. } = *head;
        let (hd, positions) = (cache.head_dim(), span.len());
        let (scores, buf) = scratch.prepare(queries.len() / hd, positions, 8 * hd);
        // Rows `slot..slot + count` of this KV head's keys or values in a block, into `buf`.
        let convert = |data: &[half::f16], slot: usize, count: usize, buf: &mut [f32]| {
            assert!((slot + count) * hd <= data.len() && count * hd <= buf.len());
            for i in 0..count {
                let src = data[(slot + i) * hd..].as_ptr();
                for c in (0..hd).step_by(8) {
                    // SAFETY: inside `data` and `buf` (asserted above); `hd` is a multiple of 8.
                    unsafe {
                        let x = _mm256_cvtph_ps(_mm_loadu_si128(src.add(c) as *const __m128i));
                        _mm256_storeu_ps(buf.as_mut_ptr().add(i * hd + c), x);
                    }
                }
            }
        };
        // Keys are asked for AHEAD positions before they are needed, into L1; each run's values
        // into L2 as its keys are read, so the value pass finds them near; a steady stream of
        // requests rather than bursts that fill the core's miss buffers.
        for p in (span.start..span.start + AHEAD).step_by(8) {
            prefetch_run::<_MM_HINT_T0>(head, cache, p, false);
        }
        let wide = hd == WIDE_HEAD && avx512_supported();
        for (p, count, block, slot) in runs(head, cache.block_size()) {
            prefetch_run::<_MM_HINT_T0>(head, cache, p + AHEAD, false);
            prefetch_run::<_MM_HINT_T1>(head, cache, p, true);
            if wide && count == 8 {
                let at = p - span.start;
                // SAFETY: AVX-512F is there (`wide`); the heads are `WIDE_HEAD` wide.
                unsafe {
                    eight_scores_avx512(cache.head(layer, block, kv_head).0, slot, queries, buf, scores, at, scale)
                };
                continue;
            }
            convert(cache.head(layer, block, kv_head).0, slot, count, buf);
            for (h, query) in queries.chunks_exact(hd).enumerate() {
                let at = h * positions + p - span.start;
                let scores = &mut scores[at..at + count];
                if count < 8 {
                    for (i, s) in scores.iter_mut().enumerate() {
                        *s = dot(query, &buf[i * hd..(i + 1) * hd]) * scale;
                    }
                    continue;
                }
                // SAFETY: `buf` holds 8 keys of `hd` values and `query` `hd`; the store writes
                // the 8 values of `scores`.
                unsafe {
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for c in (0..hd).step_by(8) {
                        let q = _mm256_loadu_ps(query.as_ptr().add(c));
                        for (i, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(q, _mm256_loadu_ps(buf.as_ptr().add(i * hd + c)), *acc);
                        }
                    }
                    _mm256_storeu_ps(scores.as_mut_ptr(), _mm256_mul_ps(eight_sums(acc), _mm256_set1_ps(scale)));
                }
            }
        }
        for (row, stats) in scores.chunks_exact_mut(positions).zip(stats.iter_mut()) {
            // SAFETY: the caller's CPU features.
            *stats = unsafe { softmax(row) };
        }
        if wide {
            // SAFETY: the CPU has AVX-512F (checked); the rows are `WIDE_HEAD` wide.
            return unsafe { weighted_values_avx512(head, cache, scores, out) };
        }
        out.fill(0.0);
        for (p, count, block, slot) in runs(head, cache.block_size()) {
            prefetch_run::<_MM_HINT_T0>(head, cache, p + AHEAD, true);
            convert(cache.head(layer, block, kv_head).1, slot, count, buf);
            for (h, acc) in out.chunks_exact_mut(hd).enumerate() {
                let at = h * positions + p - span.start;
                let weights = &scores[at..at + count];
                for c in (0..hd).step_by(8) {
                    // SAFETY: `acc` and each of the `count` rows of `buf` hold `hd` values, a
                    // multiple of 8.
                    unsafe {
                        let mut sum = _mm256_loadu_ps(acc.as_ptr().add(c));
                        for (i, &w) in weights.iter().enumerate() {
                            sum =
                                _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(buf.as_ptr().add(i * hd + c)), sum);
                        }
                        _mm256_storeu_ps(acc.as_mut_ptr().add(c), sum);
                    }
                }
            }
        }
    }

    /// The head width the AVX-512 paths are written for.
    const WIDE_HEAD: usize = 64;

    fn avx512_supported() -> bool {
        static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SUPPORTED.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && std::env::var("MANTLE_KERNELS").as_deref() != Ok("avx2")
        })
    }

    /// `out[h] = sum over the span's positions p of weights[h][p] × value[p]` for the group's
    /// query heads, with AVX-512: up to 4 heads at a time keep their sums in registers (4 × 16
    /// lanes each) through the whole span, and each cached value row is converted once and
    /// used by all of them, rather than sums loaded and stored per run and rows read once per
    /// head.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn weighted_values_avx512(head: &Head<'_>, cache: &KvCache, weights: &[f32], out: &mut [f32]) {
        let heads = out.len() / WIDE_HEAD;
        let positions = head.span.len();
        for h0 in (0..heads).step_by(4) {
            let (weights, out) = (&weights[h0 * positions..], &mut out[h0 * WIDE_HEAD..]);
            let first = h0 == 0;
            // SAFETY: the caller's CPU features; `weights` holds a row of `positions` per head
            // and `out` `WIDE_HEAD` values per head, for each head of the pass.
            unsafe {
                match heads - h0 {
                    1 => values_pass::<1>(head, cache, weights, out, first),
                    2 => values_pass::<2>(head, cache, weights, out, first),
                    3 => values_pass::<3>(head, cache, weights, out, first),
                    _ => values_pass::<4>(head, cache, weights, out, first),
                }
            }
        }
    }

    /// [`weighted_values_avx512`] for `H` heads, whose weight rows start `weights` and sums `out`;
    /// `prefetch`: ask for the rows ahead (the first pass over the span).
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn values_pass<const H: usize>(
        head: &Head<'_>,
        cache: &KvCache,
        weights: &[f32],
        out: &mut [f32],
        prefetch: bool,
    ) {
        let positions = head.span.len();
        assert!(weights.len() >= (H - 1) * positions + positions && out.len() >= H * WIDE_HEAD);
        let mut acc = [[_mm512_setzero_ps(); 4]; H];
        for (p, count, block, slot) in runs(head, cache.block_size()) {
            if prefetch {
                prefetch_run::<_MM_HINT_T0>(head, cache, p + AHEAD, true);
            }
            let rows = cache.head(head.layer, block, head.kv_head).1;
            assert!((slot + count) * WIDE_HEAD <= rows.len());
            for i in 0..count {
                // SAFETY: row `slot + i` lies inside `rows` (asserted); the weight index is
                // below `positions` for each of the H heads (asserted above).
                unsafe {
                    let src = rows.as_ptr().add((slot + i) * WIDE_HEAD) as *const __m256i;
                    let v = [0, 1, 2, 3].map(|c| _mm512_cvtph_ps(_mm256_loadu_si256(src.add(c))));
                    let at = p - head.span.start + i;
                    for (h, acc) in acc.iter_mut().enumerate() {
                        let w = _mm512_set1_ps(*weights.get_unchecked(h * positions + at));
                        for (a, v) in acc.iter_mut().zip(v) {
                            *a = _mm512_fmadd_ps(w, v, *a);
                        }
                    }
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (c, a) in acc.iter().enumerate() {
                // SAFETY: inside `out` (asserted above).
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(h * WIDE_HEAD + c * 16), *a) };
            }
        }
    }

    /// The sums of each of 8 vectors, in order.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn eight_sums(acc: [__m256; 8]) -> __m256 {
        let pairs = [
            _mm256_hadd_ps(acc[0], acc[1]),
            _mm256_hadd_ps(acc[2], acc[3]),
            _mm256_hadd_ps(acc[4], acc[5]),
            _mm256_hadd_ps(acc[6], acc[7]),
        ];
        // [0..3 of the low halves, 0..3 of the high halves], then halves added.
        let (low, high) = (_mm256_hadd_ps(pairs[0], pairs[1]), _mm256_hadd_ps(pairs[2], pairs[3]));
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(low, high), _mm256_permute2f128_ps::<0x31>(low, high))
    }

    /// The scores of 8 cached keys (rows `slot..slot + 8` of `keys`) for each query head, into
    /// `scores[h * positions + at..][..8]` (`positions` = `scores.len()` / heads), with AVX-512:
    /// the keys converted once into `buf`, then per head 4 × 8 fused multiply-adds 16 wide and
    /// one reduction of the 8 sums.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn eight_scores_avx512(
        keys: &[half::f16],
        slot: usize,
        queries: &[f32],
        buf: &mut [f32],
        scores: &mut [f32],
        at: usize,
        scale: f32,
    ) {
        const W: usize = WIDE_HEAD;
        let heads = queries.len() / W;
        let positions = scores.len() / heads;
        assert!((slot + 8) * W <= keys.len() && buf.len() >= 8 * W && at + 8 <= positions);
        // SAFETY: the reads and writes stay inside `keys`, `buf`, `queries` and `scores`
        // (asserted above).
        unsafe {
            let src = keys.as_ptr().add(slot * W) as *const __m256i;
            for v in 0..8 * W / 16 {
                _mm512_storeu_ps(buf.as_mut_ptr().add(v * 16), _mm512_cvtph_ps(_mm256_loadu_si256(src.add(v))));
            }
            for (h, query) in queries.chunks_exact(W).enumerate() {
                let q = [0, 1, 2, 3].map(|c| _mm512_loadu_ps(query.as_ptr().add(c * 16)));
                let mut acc = [_mm512_setzero_ps(); 8];
                for (i, acc) in acc.iter_mut().enumerate() {
                    for (c, q) in q.iter().enumerate() {
                        *acc = _mm512_fmadd_ps(*q, _mm512_loadu_ps(buf.as_ptr().add(i * W + c * 16)), *acc);
                    }
                }
                let halves = acc.map(|a| {
                    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
                    _mm256_add_ps(_mm512_castps512_ps256(a), high)
                });
                let sums = _mm256_mul_ps(eight_sums(halves), _mm256_set1_ps(scale));
                _mm256_storeu_ps(scores.as_mut_ptr().add(h * positions + at), sums);
            }
        }
    }

    /// How far ahead of its use a key or value row is asked for, in positions.
    const AHEAD: usize = 32;

    /// Asks for the keys (or values) of the run of positions starting at `p` (at most 8, within
    /// one block and the span): the blocks of a sequence lie anywhere in the cache, so the
    /// hardware prefetcher cannot guess them.
    #[inline(always)]
    fn prefetch_run<const HINT: i32>(head: &Head<'_>, cache: &KvCache, p: usize, values: bool) {
        if p >= head.span.end {
            return;
        }
        let (bs, hd) = (cache.block_size(), cache.head_dim());
        let slot = p % bs;
        let count = 8.min(bs - slot).min(head.span.end - p);
        let (keys, vals) = cache.head(head.layer, head.blocks[p / bs], head.kv_head);
        let rows = &(if values { vals } else { keys })[slot * hd..(slot + count) * hd];
        for line in (0..std::mem::size_of_val(rows)).step_by(64) {
            // SAFETY: prefetching does not fault; the address is inside `rows` anyway.
            unsafe { _mm_prefetch::<HINT>((rows.as_ptr() as *const i8).add(line)) };
        }
    }

    /// Softmax of one row of scores, in place; returns the row's maximum and sum of exponentials.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn softmax(row: &mut [f32]) -> SpanStats {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut eights = row.chunks_exact_mut(8);
        let mut sum = 0.0;
        for eight in &mut eights {
            // SAFETY: `eight` holds 8 values.
            unsafe {
                let e = crate::vmath::x86::exp(_mm256_sub_ps(_mm256_loadu_ps(eight.as_ptr()), _mm256_set1_ps(max)));
                _mm256_storeu_ps(eight.as_mut_ptr(), e);
            }
            sum += eight.iter().sum::<f32>();
        }
        for v in eights.into_remainder() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
        SpanStats { max, sum }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised paths against the portable one, over block boundaries and partial runs,
    /// for a narrow head (AVX2 only) and a 64-wide one (AVX-512 where the CPU has it) with 5
    /// query heads per KV head (value passes of 4 heads and of 1), in blocks of 4 (runs of 4
    /// keys at most) and of 16 (whole runs of 8).
    #[test]
    fn both_paths_attend_alike() {
        for (hd, heads, bs) in [(16, 2, 4), (64, 5, 4), (64, 5, 16)] {
            attend_alike(hd, heads, bs);
        }
    }

    fn attend_alike(hd: usize, heads: usize, bs: usize) {
        let kv_heads = 2;
        let kv_dim = kv_heads * hd;
        let mut cache = KvCache::new(1, kv_heads, hd, bs, 8);
        let blocks = [5u32, 2, 7, 0, 3];
        let value = |p: usize, i: usize| ((p * 31 + i * 7) % 23) as f32 / 11.0 - 1.0;
        for p in 0..19 {
            let key: Vec<f32> = (0..kv_dim).map(|i| value(p, i)).collect();
            let val: Vec<f32> = (0..kv_dim).map(|i| value(p + 3, i)).collect();
            cache.write(0, blocks[p / bs], p % bs, &key, &val);
        }
        let queries: Vec<f32> = (0..heads * hd).map(|i| value(40, i) * 2.0).collect();
        let run = |span: std::ops::Range<usize>, wide: bool| {
            let head = Head { layer: 0, blocks: &blocks, queries: &queries, kv_head: 1, span, scale: 0.25 };
            let (mut out, mut stats) = (vec![0f32; heads * hd], vec![SpanStats::default(); heads]);
            attend(&head, &cache, &mut AttendScratch::default(), &mut out, &mut stats, wide);
            (out, stats)
        };
        let close = |a: &[f32], b: &[f32], what: &str| {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5, "{what}: {x} vs {y}");
            }
        };
        for positions in [1, 3, 8, 9, 17, 19] {
            let (portable, portable_stats) = run(0..positions, false);
            let (wide, wide_stats) = run(0..positions, wide_supported());
            close(&portable, &wide, &format!("{hd} wide, {positions} positions"));
            for (a, b) in portable_stats.iter().zip(&wide_stats) {
                assert!((a.max - b.max).abs() < 1e-5 && (a.sum - b.sum).abs() < 1e-4, "{a:?} vs {b:?}");
            }
            if positions == 1 {
                // One position: softmax weight 1, the output is that position's value.
                let expected: Vec<f32> = (hd..2 * hd).map(|i| half::f16::from_f32(value(3, i)).to_f32()).collect();
                for h in 0..heads {
                    assert_eq!(&portable[h * hd..(h + 1) * hd], &expected[..]);
                    assert_eq!(&wide[h * hd..(h + 1) * hd], &expected[..]);
                }
            }
        }
        // Spans (starting mid-block, mid-run) merged give the whole.
        for wide in [false, wide_supported()] {
            let (whole, _) = run(0..19, wide);
            let parts = [run(0..6, wide), run(6..13, wide), run(13..19, wide)];
            let spans: Vec<f32> = parts.iter().flat_map(|(o, _)| o.clone()).collect();
            let stats: Vec<SpanStats> = parts.iter().flat_map(|(_, s)| s.clone()).collect();
            let mut merged = vec![0f32; heads * hd];
            merge(&spans, &stats, &mut merged);
            close(&merged, &whole, "merged spans");
            assert!(merged.iter().zip(&parts[0].0).any(|(a, b)| (a - b).abs() > 1e-3), "the spans differ");
        }
    }
}
