//! AVX-512 VNNI kernels for a batch of tokens (continuous batching's decode steps, prefill).
//!
//! The weights are repacked once, at load time ([`Packed`]), 16 rows at a time: for each block,
//! one 512-bit vector holds the same 4 quants of the 16 rows, one row per i32 lane. `vpdpbusd`
//! (64 u8 × i8 products summed 4 at a time into 16 i32 lanes, one instruction) against a token's
//! 4 activation quants broadcast to every lane then keeps each row's sum in a lane of its own: 8
//! of them multiply a block of 16 rows by one token, the block scales apply to 16 rows per
//! instruction, and the 16 results come out as one vector, with no horizontal sums. Per token
//! and 64 weights that is one `vpdpbusd` and about half an instruction of scaling.
//!
//! Each unpacked block of 16 rows is used by up to [`GROUP`] tokens before the next is read.

use std::arch::x86_64::*;
use std::borrow::Cow;

use super::super::{BlockQ8, WeightType};

/// Tokens multiplied by one unpacked block of rows at a time.
pub const GROUP: usize = 8;

/// Rows packed together: one per i32 lane of a 512-bit vector.
pub const ROWS: usize = 16;

/// 64 bytes, aligned so that a vector load never splits a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Bytes of one block of 16 rows, a whole number of lines:
/// - Q4_1: 4 lines of packed nibbles (line `k`: bytes `4k..4k + 4` of each row's 16, whose low
///   nibbles are quants `4k..4k + 4` and high nibbles quants `16 + 4k..`), then each row's `d`
///   and `m` (16 f16 each);
/// - Q8_0: 8 lines of quants (line `k`: quants `4k..4k + 4` of each row), then each row's `d`
///   (f16) and `sum(qs)` (i16, for the unsigned-activation correction).
const fn packed_block_bytes(wtype: WeightType) -> usize {
    match wtype {
        WeightType::Q4_1 => 5 * 64,
        WeightType::Q8_0 => 9 * 64,
    }
}

/// A weight matrix repacked for these kernels: groups of 16 rows (the last padded with zero
/// rows), each `kb` packed blocks.
pub struct Packed {
    wtype: WeightType,
    kb: usize,
    groups: usize,
    lines: Vec<Line>,
}

impl Packed {
    /// Repacks `rows` rows of `kb` blocks from their GGUF layout.
    pub fn new(wtype: WeightType, data: &[u8], rows: usize, kb: usize) -> Self {
        use rayon::prelude::*;
        let bb = wtype.block_bytes();
        let per_block = packed_block_bytes(wtype) / 64;
        let groups = rows.div_ceil(ROWS);
        let mut lines = vec![Line([0; 64]); groups * kb * per_block];
        lines.par_chunks_mut(kb * per_block).enumerate().for_each(|(g, out)| {
            for (b, out) in out.chunks_exact_mut(per_block).enumerate() {
                let bytes = bytes_of(out);
                for i in 0..ROWS.min(rows - g * ROWS) {
                    let at = ((g * ROWS + i) * kb + b) * bb;
                    pack_block(wtype, &data[at..at + bb], i, bytes);
                }
            }
        });
        Packed { wtype, kb, groups, lines }
    }

    /// Groups of 16 rows.
    pub fn groups(&self) -> usize {
        self.groups
    }

    fn group(&self, g: usize) -> *const u8 {
        self.lines.as_ptr().wrapping_add(g * self.kb * packed_block_bytes(self.wtype) / 64) as *const u8
    }
}

/// Places one GGUF block as row `i` of a packed block (see [`packed_block_bytes`]).
fn pack_block(wtype: WeightType, block: &[u8], i: usize, out: &mut [u8]) {
    let quant_lines = match wtype {
        WeightType::Q4_1 => 4,
        WeightType::Q8_0 => 8,
    };
    let quants_at = block.len() - 4 * quant_lines; // after d, m (Q4_1) or d (Q8_0)
    for k in 0..quant_lines {
        out[64 * k + 4 * i..64 * k + 4 * i + 4].copy_from_slice(&block[quants_at + 4 * k..quants_at + 4 * k + 4]);
    }
    let scales = 64 * quant_lines;
    out[scales + 2 * i..scales + 2 * i + 2].copy_from_slice(&block[0..2]);
    let second = match wtype {
        WeightType::Q4_1 => [block[2], block[3]],
        WeightType::Q8_0 => block[2..].iter().map(|&q| q as i8 as i16).sum::<i16>().to_le_bytes(),
    };
    out[scales + 32 + 2 * i..scales + 32 + 2 * i + 2].copy_from_slice(&second);
}

/// The bytes of `lines`.
fn bytes_of(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: `Line` is 64 plain bytes with no padding.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, lines.len() * 64) }
}

/// The activations as a product with `wtype` weights takes them: as they are for Q4_1 (unsigned
/// nibbles × signed activations); offset by +128 for Q8_0's signed weights, since `vpdpbusd`
/// multiplies unsigned by signed bytes (the kernel takes `128 × sum(w)` off again).
pub fn activations(wtype: WeightType, x: &[BlockQ8]) -> Cow<'_, [BlockQ8]> {
    match wtype {
        WeightType::Q4_1 => Cow::Borrowed(x),
        WeightType::Q8_0 => {
            Cow::Owned(x.iter().map(|b| BlockQ8 { qs: b.qs.map(|q| (q as u8 ^ 0x80) as i8), ..*b }).collect())
        }
    }
}

/// The batched kernels, where the CPU has AVX-512 with VNNI.
#[derive(Clone, Copy)]
pub struct BatchKernels(());

impl BatchKernels {
    pub fn detect() -> Option<Self> {
        let supported = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && super::supported();
        supported.then_some(BatchKernels(()))
    }

    /// Rows `16g..16g + 16` of `w` against tokens `t0..t0 + n` (`n <= GROUP`) of `x` (from
    /// [`activations`]), into `out[..n]`: 8 or 4 tokens at once, the rest one at a time.
    pub fn product(self, w: &Packed, g: usize, x: &[BlockQ8], t0: usize, n: usize, out: &mut [[f32; ROWS]; GROUP]) {
        assert!(g < w.groups && n <= GROUP && (t0 + n) * w.kb <= x.len());
        // 16 tokens at once would keep 16 accumulators, 8 unpacked weight vectors and the
        // block scales in registers: more than the 32 there are.
        let kernels: [(usize, GroupFn); 3] = match w.wtype {
            WeightType::Q4_1 => [(8, q4_1_rows::<8>), (4, q4_1_rows::<4>), (1, q4_1_rows::<1>)],
            WeightType::Q8_0 => [(8, q8_0_rows::<8>), (4, q8_0_rows::<4>), (1, q8_0_rows::<1>)],
        };
        let mut j = 0;
        while j < n {
            let (size, kernel) = kernels.into_iter().find(|&(size, _)| size <= n - j).unwrap_or(kernels[2]);
            // SAFETY: `detect` found the CPU features; the group and tokens `t0 + j..t0 + j + size`
            // are in bounds (checked above), and `out[j..]` holds `size` rows.
            unsafe { kernel(w, g, x, t0 + j, &mut out[j..j + size]) };
            j += size;
        }
    }
}

/// One group's kernel for a fixed number of tokens from a start token, into as many rows.
type GroupFn = unsafe fn(&Packed, usize, &[BlockQ8], usize, &mut [[f32; ROWS]]);

/// Fetches the lines of the block [`super::PREFETCH_DISTANCE`] bytes ahead of the one at `base`
/// (the hardware prefetcher stops at page boundaries).
#[inline(always)]
fn prefetch(base: *const u8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        // SAFETY: prefetching does not fault, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(super::PREFETCH_DISTANCE + line) as *const i8) };
    }
}

/// Activation quants `4k..4k + 4` of `block`, in every lane.
#[inline(always)]
unsafe fn broadcast(block: &BlockQ8, k: usize) -> __m512i {
    // SAFETY: `k < 8`, inside the 32 quants; the caller has AVX-512.
    unsafe { _mm512_set1_epi32(std::ptr::read_unaligned(block.qs.as_ptr().add(4 * k) as *const i32)) }
}

/// Q4_1 rows of group `g` × `N` tokens from `t0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_1_rows<const N: usize>(w: &Packed, g: usize, x: &[BlockQ8], t0: usize, out: &mut [[f32; ROWS]]) {
    let kb = w.kb;
    let bytes = packed_block_bytes(WeightType::Q4_1);
    let low_nibbles = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    // SAFETY (whole body): the caller checked that group `g` exists and `x` holds tokens
    // `t0..t0 + N`; every pointer below stays inside those.
    unsafe {
        let group = w.group(g);
        for b in 0..kb {
            let base = group.add(b * bytes);
            prefetch(base, bytes);
            let mut q4 = [_mm512_setzero_si512(); 8];
            for k in 0..4 {
                let packed = _mm512_load_si512(base.add(64 * k) as *const __m512i);
                q4[k] = _mm512_and_si512(packed, low_nibbles);
                q4[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low_nibbles);
            }
            let dw = _mm512_cvtph_ps(_mm256_load_si256(base.add(256) as *const __m256i));
            let m = _mm512_cvtph_ps(_mm256_load_si256(base.add(288) as *const __m256i));
            for (j, acc) in acc.iter_mut().enumerate() {
                let xb = x.get_unchecked((t0 + j) * kb + b);
                // Two chains of four, so one token's sums do not wait on each other.
                let mut even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q4[0], broadcast(xb, 0));
                let mut odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q4[1], broadcast(xb, 1));
                for k in (2..8).step_by(2) {
                    even = _mm512_dpbusd_epi32(even, q4[k], broadcast(xb, k));
                    odd = _mm512_dpbusd_epi32(odd, q4[k + 1], broadcast(xb, k + 1));
                }
                let sums = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
                *acc = _mm512_fmadd_ps(sums, _mm512_mul_ps(dw, _mm512_set1_ps(xb.d)), *acc);
                *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(xb.s), *acc);
            }
        }
        for j in 0..N {
            _mm512_storeu_ps(out[j].as_mut_ptr(), acc[j]);
        }
    }
}

/// Q8_0 rows of group `g` × `N` tokens from `t0`; `x` is offset by +128 ([`activations`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_rows<const N: usize>(w: &Packed, g: usize, x: &[BlockQ8], t0: usize, out: &mut [[f32; ROWS]]) {
    let kb = w.kb;
    let bytes = packed_block_bytes(WeightType::Q8_0);
    let mut acc = [_mm512_setzero_ps(); N];
    // SAFETY (whole body): as in `q4_1_rows`.
    unsafe {
        let group = w.group(g);
        for b in 0..kb {
            let base = group.add(b * bytes);
            prefetch(base, bytes);
            let q8: [__m512i; 8] = std::array::from_fn(|k| _mm512_load_si512(base.add(64 * k) as *const __m512i));
            let dw = _mm512_cvtph_ps(_mm256_load_si256(base.add(512) as *const __m256i));
            let correction =
                _mm512_slli_epi32::<7>(_mm512_cvtepi16_epi32(_mm256_load_si256(base.add(544) as *const __m256i)));
            for (j, acc) in acc.iter_mut().enumerate() {
                let xb = x.get_unchecked((t0 + j) * kb + b);
                let mut even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), broadcast(xb, 0), q8[0]);
                let mut odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), broadcast(xb, 1), q8[1]);
                for k in (2..8).step_by(2) {
                    even = _mm512_dpbusd_epi32(even, broadcast(xb, k), q8[k]);
                    odd = _mm512_dpbusd_epi32(odd, broadcast(xb, k + 1), q8[k + 1]);
                }
                let sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(even, odd), correction));
                *acc = _mm512_fmadd_ps(sums, _mm512_mul_ps(dw, _mm512_set1_ps(xb.d)), *acc);
            }
        }
        for j in 0..N {
            _mm512_storeu_ps(out[j].as_mut_ptr(), acc[j]);
        }
    }
}
