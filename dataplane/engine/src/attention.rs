//! Causal attention of one token's query heads over its sequence's cached keys and values.
//!
//! A task is one token and one KV head, with the query heads that share it (grouped-query
//! attention), so each cached key and value is read once per task. The cache is read a block at
//! a time: the positions of a block are rows of one contiguous slice.

use half::slice::HalfFloatSliceExt;

use crate::kv_cache::KvCache;

/// One task: the query heads that share one KV head, for one token.
pub struct Head<'a> {
    pub layer: usize,
    pub blocks: &'a [u32],
    /// The group's query heads, `head_dim` values each.
    pub queries: &'a [f32],
    /// The KV head.
    pub kv_head: usize,
    /// Cached positions the token attends to (its own included).
    pub positions: usize,
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

/// Whether [`attend`]'s vectorised path can run here (AVX2, FMA and F16C).
pub fn wide_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::quant::x86_supported();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Softmax attention of `head.queries` over the cached positions, into `out` (one `head_dim` row
/// per query head); `wide`: as [`wide_supported`] says.
pub fn attend(head: &Head<'_>, cache: &KvCache, scratch: &mut AttendScratch, out: &mut [f32], wide: bool) {
    #[cfg(target_arch = "x86_64")]
    if wide && cache.head_dim().is_multiple_of(8) {
        // SAFETY: the caller found AVX2, FMA and F16C; `head_dim` is a multiple of 8.
        return unsafe { x86::attend(head, cache, scratch, out) };
    }
    let _ = wide;
    attend_portable(head, cache, scratch, out);
}

/// Runs of up to 8 positions that lie in one block: (first position, count, block, its slot).
fn runs(head: &Head<'_>, block_size: usize) -> impl Iterator<Item = (usize, usize, u32, usize)> {
    let (positions, blocks) = (head.positions, head.blocks);
    (0..positions).step_by(block_size).flat_map(move |start| {
        let n = block_size.min(positions - start);
        (0..n).step_by(8).map(move |slot| (start + slot, 8.min(n - slot), blocks[start / block_size], slot))
    })
}

fn attend_portable(head: &Head<'_>, cache: &KvCache, scratch: &mut AttendScratch, out: &mut [f32]) {
    let Head { layer, queries, kv_head, positions, scale, .. } = *head;
    let hd = cache.head_dim();
    let AttendScratch { scores, kv: buf } = scratch;
    scores.clear();
    scores.resize(queries.len() / hd * positions, 0.0);
    buf.resize(hd, 0.0);
    let range = |slot: usize| slot * hd..(slot + 1) * hd;
    for (p, count, block, slot) in runs(head, cache.block_size()) {
        let keys = cache.head(layer, block, kv_head).0;
        for i in 0..count {
            keys[range(slot + i)].convert_to_f32_slice(buf);
            for (h, query) in queries.chunks_exact(hd).enumerate() {
                scores[h * positions + p + i] = dot(query, buf) * scale;
            }
        }
    }
    for row in scores.chunks_exact_mut(positions) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.iter_mut().for_each(|v| *v = (*v - max).exp());
        let inv = 1.0 / row.iter().sum::<f32>();
        row.iter_mut().for_each(|v| *v *= inv);
    }
    out.fill(0.0);
    for (p, count, block, slot) in runs(head, cache.block_size()) {
        let values = cache.head(layer, block, kv_head).1;
        for i in 0..count {
            values[range(slot + i)].convert_to_f32_slice(buf);
            for (h, acc) in out.chunks_exact_mut(hd).enumerate() {
                let w = scores[h * positions + p + i];
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
    //! position); softmax's exponentials and the weighted sum of values run 8 lanes wide.
    use std::arch::x86_64::*;

    use super::{AttendScratch, Head, dot, runs};
    use crate::kv_cache::KvCache;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend(head: &Head<'_>, cache: &KvCache, scratch: &mut AttendScratch, out: &mut [f32]) {
        let Head { layer, queries, kv_head, positions, scale, .. } = *head;
        let hd = cache.head_dim();
        let AttendScratch { scores, kv: buf } = scratch;
        scores.clear();
        scores.resize(queries.len() / hd * positions, 0.0);
        buf.resize(8 * hd, 0.0);
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
        // The values are needed after all the keys: ask for them now, into L2.
        for b in 0..positions.div_ceil(cache.block_size()) {
            prefetch_block::<_MM_HINT_T1>(cache.head(layer, head.blocks[b], kv_head).1);
        }
        for (p, count, block, slot) in runs(head, cache.block_size()) {
            if slot == 0 {
                prefetch_next_block(head, cache, p, false);
            }
            convert(cache.head(layer, block, kv_head).0, slot, count, buf);
            for (h, query) in queries.chunks_exact(hd).enumerate() {
                let scores = &mut scores[h * positions + p..h * positions + p + count];
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
                    let pairs = [
                        _mm256_hadd_ps(acc[0], acc[1]),
                        _mm256_hadd_ps(acc[2], acc[3]),
                        _mm256_hadd_ps(acc[4], acc[5]),
                        _mm256_hadd_ps(acc[6], acc[7]),
                    ];
                    // [0..3 of the low halves, 0..3 of the high halves], then halves added.
                    let (low, high) = (_mm256_hadd_ps(pairs[0], pairs[1]), _mm256_hadd_ps(pairs[2], pairs[3]));
                    let sums = _mm256_add_ps(
                        _mm256_permute2f128_ps::<0x20>(low, high),
                        _mm256_permute2f128_ps::<0x31>(low, high),
                    );
                    _mm256_storeu_ps(scores.as_mut_ptr(), _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
                }
            }
        }
        for row in scores.chunks_exact_mut(positions) {
            // SAFETY: the caller's CPU features.
            unsafe { softmax(row) };
        }
        out.fill(0.0);
        for (p, count, block, slot) in runs(head, cache.block_size()) {
            if slot == 0 {
                prefetch_next_block(head, cache, p, true);
            }
            convert(cache.head(layer, block, kv_head).1, slot, count, buf);
            for (h, acc) in out.chunks_exact_mut(hd).enumerate() {
                let weights = &scores[h * positions + p..h * positions + p + count];
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

    /// Asks for the keys (or values) of the block after the one holding position `p`, so that
    /// they arrive while this one is computed: the blocks of a sequence lie anywhere in the
    /// cache, so the hardware prefetcher cannot guess them.
    #[inline(always)]
    fn prefetch_next_block(head: &Head<'_>, cache: &KvCache, p: usize, values: bool) {
        let bs = cache.block_size();
        let next = p / bs + 1;
        if next * bs >= head.positions {
            return;
        }
        let (keys, vals) = cache.head(head.layer, head.blocks[next], head.kv_head);
        prefetch_block::<_MM_HINT_T0>(if values { vals } else { keys });
    }

    #[inline(always)]
    fn prefetch_block<const HINT: i32>(data: &[half::f16]) {
        for line in (0..std::mem::size_of_val(data)).step_by(64) {
            // SAFETY: prefetching does not fault; the address is inside `data` anyway.
            unsafe { _mm_prefetch::<HINT>((data.as_ptr() as *const i8).add(line)) };
        }
    }

    /// Softmax of one row of scores, in place.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn softmax(row: &mut [f32]) {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised path against the portable one, over block boundaries and partial runs.
    #[test]
    fn both_paths_attend_alike() {
        let (hd, heads, kv_heads, bs) = (16, 2, 2, 4);
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
        for positions in [1, 3, 8, 9, 17, 19] {
            let head = Head { layer: 0, blocks: &blocks, queries: &queries, kv_head: 1, positions, scale: 0.25 };
            let mut portable = vec![0f32; heads * hd];
            attend(&head, &cache, &mut AttendScratch::default(), &mut portable, false);
            let mut wide = vec![0f32; heads * hd];
            attend(&head, &cache, &mut AttendScratch::default(), &mut wide, wide_supported());
            for (a, b) in portable.iter().zip(&wide) {
                assert!((a - b).abs() < 1e-5, "{positions} positions: {a} vs {b}");
            }
            if positions == 1 {
                // One position: softmax weight 1, the output is that position's value.
                let expected: Vec<f32> = (hd..2 * hd).map(|i| half::f16::from_f32(value(3, i)).to_f32()).collect();
                assert_eq!(&portable[..hd], &expected[..]);
            }
        }
    }
}
