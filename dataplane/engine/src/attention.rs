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
    /// The KV head's range within a cached key or value.
    pub kv: std::ops::Range<usize>,
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
    if wide && head.kv.len().is_multiple_of(8) {
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
    let Head { layer, queries, ref kv, positions, scale, .. } = *head;
    let (hd, kv_dim) = (kv.len(), cache.kv_dim());
    let AttendScratch { scores, kv: buf } = scratch;
    scores.clear();
    scores.resize(queries.len() / hd * positions, 0.0);
    buf.resize(hd, 0.0);
    let range = |slot: usize| slot * kv_dim + kv.start..slot * kv_dim + kv.end;
    for (p, count, block, slot) in runs(head, cache.block_size()) {
        let keys = cache.block(layer, block).0;
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
        let values = cache.block(layer, block).1;
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
        let Head { layer, queries, ref kv, positions, scale, .. } = *head;
        let (hd, kv_dim) = (kv.len(), cache.kv_dim());
        let AttendScratch { scores, kv: buf } = scratch;
        scores.clear();
        scores.resize(queries.len() / hd * positions, 0.0);
        buf.resize(8 * hd, 0.0);
        // Rows `slot..slot + count` of a block's keys or values, this KV head's part, into `buf`.
        let convert = |data: &[half::f16], slot: usize, count: usize, buf: &mut [f32]| {
            assert!((slot + count - 1) * kv_dim + kv.end <= data.len() && count * hd <= buf.len());
            for i in 0..count {
                let src = data[(slot + i) * kv_dim + kv.start..].as_ptr();
                for c in (0..hd).step_by(8) {
                    // SAFETY: inside `data` and `buf` (asserted above); `hd` is a multiple of 8.
                    unsafe {
                        let x = _mm256_cvtph_ps(_mm_loadu_si128(src.add(c) as *const __m128i));
                        _mm256_storeu_ps(buf.as_mut_ptr().add(i * hd + c), x);
                    }
                }
            }
        };
        for (p, count, block, slot) in runs(head, cache.block_size()) {
            convert(cache.block(layer, block).0, slot, count, buf);
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
            convert(cache.block(layer, block).1, slot, count, buf);
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

    /// Softmax of one row of scores, in place.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn softmax(row: &mut [f32]) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut eights = row.chunks_exact_mut(8);
        let mut sum = 0.0;
        for eight in &mut eights {
            // SAFETY: `eight` holds 8 values.
            unsafe {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(eight.as_ptr()), _mm256_set1_ps(max)));
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

    /// `e^x` for each lane (Cephes' single-precision polynomial, within 2 ulp; inputs below
    /// -87.3 come out as about 1e-38 rather than 0, which softmax cannot tell apart).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.376_26)), _mm256_set1_ps(-87.336_55));
        // x = n ln 2 + r, |r| <= ln 2 / 2.
        let n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5)));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e_r = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        // 2^n: n + 127 in the exponent bits.
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_mul_ps(e_r, two_n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_a_few_ulp_of_the_library() {
        use std::arch::x86_64::*;
        if !wide_supported() {
            return;
        }
        for i in 0..2000 {
            let xs: [f32; 8] = std::array::from_fn(|j| -87.0 + (i * 8 + j) as f32 * 0.0059);
            let mut got = [0f32; 8];
            // SAFETY: the CPU has AVX2 and FMA (checked above); both arrays hold 8 floats.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), x86::exp(_mm256_loadu_ps(xs.as_ptr()))) };
            for (x, g) in xs.iter().zip(got) {
                let want = x.exp();
                assert!((g - want).abs() <= 4.0 * f32::EPSILON * want, "exp({x}) = {g}, want {want}");
            }
        }
    }

    /// The vectorised path against the portable one, over block boundaries and partial runs.
    #[test]
    fn both_paths_attend_alike() {
        let (hd, heads, kv_heads, bs) = (16, 2, 2, 4);
        let kv_dim = kv_heads * hd;
        let mut cache = KvCache::new(1, kv_dim, bs, 8);
        let blocks = [5u32, 2, 7, 0, 3];
        let value = |p: usize, i: usize| ((p * 31 + i * 7) % 23) as f32 / 11.0 - 1.0;
        for p in 0..19 {
            let key: Vec<f32> = (0..kv_dim).map(|i| value(p, i)).collect();
            let val: Vec<f32> = (0..kv_dim).map(|i| value(p + 3, i)).collect();
            cache.write(0, blocks[p / bs], p % bs, &key, &val);
        }
        let queries: Vec<f32> = (0..heads * hd).map(|i| value(40, i) * 2.0).collect();
        for positions in [1, 3, 8, 9, 17, 19] {
            let head = Head { layer: 0, blocks: &blocks, queries: &queries, kv: hd..2 * hd, positions, scale: 0.25 };
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
