//! AVX-512 VNNI kernels for a batch of tokens (continuous batching's decode steps, prefill).
//!
//! One weight row is unpacked two blocks (64 weights) at a time into a 512-bit register and
//! multiplied by up to [`GROUP`] tokens' activations with `vpdpbusd` (64 u8 × i8 products summed
//! into 16 i32 lanes, one instruction); each block pair's integer sums are scaled by
//! `d_w × d_x` in f32 lanes. Per token and 64 weights that is a load, `vpdpbusd`, a conversion, a
//! multiply and an FMA, where the AVX2 kernels spend about twice as many instructions on 32.
//! The activations are laid out once per product ([`Batch`]): int8 values contiguous per token,
//! and each block pair's two scales spread over the 16 lanes they apply to.

use std::arch::x86_64::*;

use super::super::{BLOCK, BlockQ8};

/// Tokens multiplied by one unpacked weight row at a time.
pub const GROUP: usize = 8;

/// One weight row (`kb` blocks, `kb` even) against tokens `t0..t0 + n` (`n <= GROUP`) of `batch`,
/// into `out[..n]`.
pub type BatchFn = fn(&[u8], &Batch, usize, usize, &mut [f32; GROUP]);

/// The batched kernels, where the CPU has AVX-512 with VNNI.
#[derive(Clone, Copy)]
pub struct BatchKernels {
    pub q4_1: BatchFn,
    pub q8_0: BatchFn,
}

impl BatchKernels {
    pub fn detect() -> Option<Self> {
        let supported = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && super::supported();
        supported.then_some(BatchKernels { q4_1, q8_0 })
    }
}

/// A batch of quantized activations laid out for the kernels here.
pub struct Batch {
    kb: usize,
    /// Per token, its `kb × 32` int8 values.
    qs: Vec<i8>,
    /// The same values + 128, as unsigned bytes (for signed weights: see [`q8_0`]).
    us: Vec<u8>,
    /// Per token and block pair: the first block's scale in lanes 0–7, the second's in 8–15.
    scales: Vec<f32>,
    /// Per token, `d × sum(qs)` of each block (Q4_1's offset factor), zero-padded to a multiple
    /// of 16 blocks.
    sums: Vec<f32>,
    /// `kb` rounded up to a multiple of 16.
    kb16: usize,
}

impl Batch {
    /// `x` holds `tokens` rows of `kb` blocks; `kb` must be even.
    pub fn new(x: &[BlockQ8], kb: usize, tokens: usize) -> Self {
        debug_assert!(kb.is_multiple_of(2) && x.len() == kb * tokens);
        let kb16 = kb.next_multiple_of(16);
        let mut batch = Batch {
            kb,
            qs: Vec::with_capacity(tokens * kb * BLOCK),
            us: Vec::with_capacity(tokens * kb * BLOCK),
            scales: Vec::with_capacity(tokens * kb * 8),
            sums: vec![0.0; tokens * kb16],
            kb16,
        };
        for (t, row) in x.chunks_exact(kb).enumerate() {
            for (b, block) in row.iter().enumerate() {
                batch.qs.extend_from_slice(&block.qs);
                batch.us.extend(block.qs.iter().map(|&q| (q as u8) ^ 0x80));
                batch.scales.extend([block.d; 8]);
                batch.sums[t * kb16 + b] = block.s;
            }
        }
        batch
    }
}

fn q4_1(w: &[u8], batch: &Batch, t0: usize, n: usize, out: &mut [f32; GROUP]) {
    // SAFETY: `detect` chose these kernels only where the CPU has the features.
    unsafe { run(w, 20, batch, t0, n, out, [q4_1_group::<8>, q4_1_group::<4>, q4_1_group::<1>]) }
}

fn q8_0(w: &[u8], batch: &Batch, t0: usize, n: usize, out: &mut [f32; GROUP]) {
    // SAFETY: as in `q4_1`.
    unsafe { run(w, 34, batch, t0, n, out, [q8_0_group::<8>, q8_0_group::<4>, q8_0_group::<1>]) }
}

/// One row's kernel for a fixed number of tokens from a start token.
type GroupFn = unsafe fn(&[u8], &Batch, usize, &mut [f32; GROUP]);

/// A row of `block_bytes` blocks against tokens `t0..t0 + n`: 8 at once, or 4 at once and the
/// rest one at a time. The caller guarantees the CPU features of `groups` (8, 4 and 1 tokens).
unsafe fn run(
    w: &[u8],
    block_bytes: usize,
    batch: &Batch,
    t0: usize,
    n: usize,
    out: &mut [f32; GROUP],
    groups: [GroupFn; 3],
) {
    assert!(w.len() >= batch.kb * block_bytes && n <= GROUP && t0 + n <= batch.qs.len() / (batch.kb * BLOCK));
    // SAFETY: bounds checked above (the row holds `kb` blocks, the batch holds tokens
    // `t0..t0 + n`); the features are the caller's promise.
    unsafe {
        let from = match n {
            8 => return groups[0](w, batch, t0, out),
            4..=7 => {
                groups[1](w, batch, t0, out);
                4
            }
            _ => 0,
        };
        let mut single = [0f32; GROUP];
        for (j, out) in out.iter_mut().enumerate().take(n).skip(from) {
            groups[2](w, batch, t0 + j, &mut single);
            *out = single[0];
        }
    }
}

/// Q4_1 row × `N` tokens from `t0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_1_group<const N: usize>(w: &[u8], batch: &Batch, t0: usize, out: &mut [f32; GROUP]) {
    let kb = batch.kb;
    let low_nibbles = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    // SAFETY (whole body): the caller checked that the row holds `kb` blocks of 20 bytes and the
    // batch holds tokens `t0..t0 + N`; every pointer below stays inside those.
    unsafe {
        let qs = batch.qs.as_ptr().add(t0 * kb * BLOCK);
        let scales = batch.scales.as_ptr().add(t0 * kb * 8);
        for p in 0..kb / 2 {
            let base = w.as_ptr().add(p * 40);
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(super::PREFETCH_DISTANCE) as *const i8);
            // Blocks 2p and 2p+1: [A, B] packed nibbles → [A & F, A >> 4, B & F, B >> 4].
            let packed = _mm256_set_m128i(
                _mm_loadu_si128(base.add(24) as *const __m128i),
                _mm_loadu_si128(base.add(4) as *const __m128i),
            );
            let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(packed), _mm256_srli_epi16::<4>(packed));
            let q4 = _mm512_and_si512(_mm512_shuffle_i64x2::<0b11_01_10_00>(both, both), low_nibbles);
            let (d0, _) = super::two_f16(base);
            let (d1, _) = super::two_f16(base.add(20));
            let dw = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
            for (j, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_si512(qs.add((j * kb + 2 * p) * BLOCK) as *const __m512i);
                let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q4, x);
                let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(scales.add((j * kb + 2 * p) * 8)));
                *acc = _mm512_fmadd_ps(scaled, dw, *acc);
            }
        }
        // The offset term, Σ m × d_x × sum(x_q), 16 blocks at a time into the same lanes: each
        // block's `m` sits in the high half of the 4 bytes that start it (gathered), and the
        // padding blocks past `kb` have zero sums.
        let offsets = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(20),
        );
        let sums = batch.sums.as_ptr().add(t0 * batch.kb16);
        for c in 0..batch.kb16 / 16 {
            let blocks = kb - c * 16;
            let mask: __mmask16 = if blocks >= 16 { 0xFFFF } else { (1u16 << blocks) - 1 };
            let words = _mm512_mask_i32gather_epi32::<1>(
                _mm512_setzero_si512(),
                mask,
                offsets,
                w.as_ptr().add(c * 16 * 20) as *const i32,
            );
            let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(words)));
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(m, _mm512_loadu_ps(sums.add(j * batch.kb16 + c * 16)), *acc);
            }
        }
        for j in 0..N {
            out[j] = _mm512_reduce_add_ps(acc[j]);
        }
    }
}

/// Q8_0 row × `N` tokens from `t0`. `vpdpbusd` multiplies unsigned by signed bytes, so the
/// activations go in offset by +128 and `128 × sum(w)` comes off again.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_group<const N: usize>(w: &[u8], batch: &Batch, t0: usize, out: &mut [f32; GROUP]) {
    let kb = batch.kb;
    let ones = _mm512_set1_epi8(1);
    let mut acc = [_mm512_setzero_ps(); N];
    // SAFETY (whole body): as in `q4_1_group`, with blocks of 34 bytes.
    unsafe {
        let us = batch.us.as_ptr().add(t0 * kb * BLOCK);
        let scales = batch.scales.as_ptr().add(t0 * kb * 8);
        for p in 0..kb / 2 {
            let base = w.as_ptr().add(p * 68);
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(super::PREFETCH_DISTANCE) as *const i8);
            let qw = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(base.add(2) as *const __m256i)),
                _mm256_loadu_si256(base.add(36) as *const __m256i),
            );
            let correction = _mm512_slli_epi32::<7>(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, qw));
            let (d0, _) = super::two_f16(base);
            let (d1, _) = super::two_f16(base.add(34));
            let dw = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
            for (j, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_si512(us.add((j * kb + 2 * p) * BLOCK) as *const __m512i);
                let sums = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), x, qw), correction);
                let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(scales.add((j * kb + 2 * p) * 8)));
                *acc = _mm512_fmadd_ps(scaled, dw, *acc);
            }
        }
        for j in 0..N {
            out[j] = _mm512_reduce_add_ps(acc[j]);
        }
    }
}
