//! AVX-512 VNNI kernels for a batch of tokens (continuous batching's decode steps, prefill).
//!
//! The weights are repacked once, at load time ([`Packed`]): each run of 16 blocks of a row (a
//! *chunk*) is interleaved so that one 512-bit vector holds the same 4 quants of all 16 blocks.
//! `vpdpbusd` (64 u8 × i8 products summed 4 at a time into 16 i32 lanes, one instruction) then
//! keeps each block's integer sum in a lane of its own: 8 of them multiply a chunk's 512 weights
//! by one token, and the block scales are applied once per chunk, 16 blocks per instruction. Per
//! token and 64 weights that is one load and one `vpdpbusd`, plus ~0.5 instructions of scaling,
//! where scaling per block pair (the layout the file has) costs three more.
//!
//! The activations are laid out the same way once per product ([`Batch`]). A row's blocks past
//! its last full chunk (the *tail*: 2 of the 18 blocks of a 576-wide row) stay in the GGUF
//! layout and go two blocks per vector, each block's sum in 8 lanes.

use std::arch::x86_64::*;

use super::super::{BLOCK, BlockQ8, WeightType};

/// Tokens multiplied by one unpacked weight chunk at a time.
pub const GROUP: usize = 8;

/// Blocks interleaved in a chunk: one per i32 lane of a 512-bit vector.
const CHUNK: usize = 16;

/// 64 bytes, aligned so that a vector load never splits a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Bytes of a repacked chunk of 16 blocks, a whole number of lines:
/// - Q4_1: 4 lines of packed nibbles (line `g`: bytes `4g..4g + 4` of each block's 16, whose
///   low nibbles are quants `4g..4g + 4` and high nibbles quants `16 + 4g..`), then 16 `d`
///   and 16 `m` (f16);
/// - Q8_0: 8 lines of quants (line `k`: quants `4k..4k + 4` of each block), then 16 `d` (f16)
///   and 16 `sum(qs)` (i16, for the unsigned-activation correction).
const fn chunk_bytes(wtype: WeightType) -> usize {
    match wtype {
        WeightType::Q4_1 => 5 * 64,
        WeightType::Q8_0 => 9 * 64,
    }
}

/// A weight matrix repacked for these kernels.
pub struct Packed {
    wtype: WeightType,
    rows: usize,
    /// Full chunks per row.
    chunks: usize,
    /// Blocks per row after the chunks (even).
    tail: usize,
    /// `rows × chunks` repacked chunks.
    lines: Vec<Line>,
    /// `rows × tail` blocks as in the GGUF file.
    tails: Vec<u8>,
}

impl Packed {
    /// Repacks `rows` rows of `kb` blocks (`kb` even) from their GGUF layout.
    pub fn new(wtype: WeightType, data: &[u8], rows: usize, kb: usize) -> Self {
        use rayon::prelude::*;
        debug_assert!(kb.is_multiple_of(2));
        let bb = wtype.block_bytes();
        let (chunks, tail) = (kb / CHUNK, kb % CHUNK);
        let lines_per_row = chunks * chunk_bytes(wtype) / 64;
        let mut lines = vec![Line([0; 64]); rows * lines_per_row];
        let mut tails = vec![0u8; rows * tail * bb];
        if lines_per_row > 0 {
            lines.par_chunks_mut(lines_per_row).enumerate().for_each(|(r, out)| {
                let row = &data[r * kb * bb..(r + 1) * kb * bb];
                for (c, out) in out.chunks_exact_mut(chunk_bytes(wtype) / 64).enumerate() {
                    pack_chunk(wtype, &row[c * CHUNK * bb..(c + 1) * CHUNK * bb], out);
                }
            });
        }
        if tail > 0 {
            for (r, out) in tails.chunks_exact_mut(tail * bb).enumerate() {
                out.copy_from_slice(&data[(r * kb + chunks * CHUNK) * bb..(r + 1) * kb * bb]);
            }
        }
        Packed { wtype, rows, chunks, tail, lines, tails }
    }

    fn chunk_row(&self, r: usize) -> *const u8 {
        self.lines.as_ptr().wrapping_add(r * self.chunks * chunk_bytes(self.wtype) / 64) as *const u8
    }

    fn tail_row(&self, r: usize) -> *const u8 {
        self.tails.as_ptr().wrapping_add(r * self.tail * self.wtype.block_bytes())
    }
}

/// Interleaves 16 GGUF blocks into one chunk (see [`chunk_bytes`]).
fn pack_chunk(wtype: WeightType, blocks: &[u8], out: &mut [Line]) {
    let bb = wtype.block_bytes();
    let bytes = bytes_of(out);
    let quant_lines = match wtype {
        WeightType::Q4_1 => 4,
        WeightType::Q8_0 => 8,
    };
    let quants_at = bb - 4 * quant_lines; // 4 (d, m) or 2 (d)
    for (b, block) in blocks.chunks_exact(bb).enumerate() {
        for g in 0..quant_lines {
            let from = quants_at + 4 * g;
            bytes[64 * g + 4 * b..64 * g + 4 * b + 4].copy_from_slice(&block[from..from + 4]);
        }
        let scales = 64 * quant_lines;
        bytes[scales + 2 * b..scales + 2 * b + 2].copy_from_slice(&block[0..2]);
        let second = match wtype {
            WeightType::Q4_1 => [block[2], block[3]],
            WeightType::Q8_0 => (block[2..].iter().map(|&q| q as i8 as i16).sum::<i16>()).to_le_bytes(),
        };
        bytes[scales + 32 + 2 * b..scales + 32 + 2 * b + 2].copy_from_slice(&second);
    }
}

/// The bytes of `lines`.
fn bytes_of(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: `Line` is 64 plain bytes with no padding.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, lines.len() * 64) }
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

    /// Row `r` of `w` against tokens `t0..t0 + n` (`n <= GROUP`) of `batch`, into `out[..n]`:
    /// 8 tokens at once, or 4 at once and the rest one at a time.
    pub fn product(self, w: &Packed, r: usize, batch: &Batch, t0: usize, n: usize, out: &mut [f32; GROUP]) {
        assert!(
            r < w.rows
                && n <= GROUP
                && t0 + n <= batch.tokens
                && (batch.chunks, batch.tail) == (w.chunks, w.tail)
                && batch.unsigned == (w.wtype == WeightType::Q8_0)
        );
        let groups: [GroupFn; 3] = match w.wtype {
            WeightType::Q4_1 => [q4_1_group::<8>, q4_1_group::<4>, q4_1_group::<1>],
            WeightType::Q8_0 => [q8_0_group::<8>, q8_0_group::<4>, q8_0_group::<1>],
        };
        // SAFETY: `detect` found the CPU features; the row and tokens are in bounds (checked
        // above) and the batch has the matrix's shape.
        unsafe {
            let from = match n {
                8 => return groups[0](w, r, batch, t0, out),
                4..=7 => {
                    groups[1](w, r, batch, t0, out);
                    4
                }
                _ => 0,
            };
            let mut single = [0f32; GROUP];
            for (j, out) in out.iter_mut().enumerate().take(n).skip(from) {
                groups[2](w, r, batch, t0 + j, &mut single);
                *out = single[0];
            }
        }
    }
}

/// One row's kernel for a fixed number of tokens from a start token.
type GroupFn = unsafe fn(&Packed, usize, &Batch, usize, &mut [f32; GROUP]);

/// A batch of quantized activations laid out for the kernels here.
pub struct Batch {
    tokens: usize,
    chunks: usize,
    tail: usize,
    /// Whether the quants are offset by +128 (for Q8_0's signed weights).
    unsigned: bool,
    /// Per token and chunk, 8 lines: line `k` holds quants `4k..4k + 4` of each of its 16 blocks.
    xs: Vec<Line>,
    /// Per token and chunk, each block's scale `d`.
    dx: Vec<f32>,
    /// Per token and chunk, each block's `d × sum(qs)` (Q4_1's offset factor).
    sx: Vec<f32>,
    /// Per token, its tail blocks' 32 quants each.
    tq: Vec<u8>,
    /// Per token and tail block pair: the first block's scale in lanes 0–7, the second's in 8–15.
    tscales: Vec<f32>,
    /// Per token and tail block, `d × sum(qs)`.
    tsums: Vec<f32>,
}

impl Batch {
    /// `x` holds `tokens` rows of `kb` blocks (`kb` even), for a product with weights of `wtype`.
    pub fn new(x: &[BlockQ8], kb: usize, tokens: usize, wtype: WeightType) -> Self {
        use rayon::prelude::*;
        debug_assert!(kb.is_multiple_of(2) && x.len() == kb * tokens);
        let (chunks, tail) = (kb / CHUNK, kb % CHUNK);
        let unsigned = wtype == WeightType::Q8_0;
        let flip = if unsigned { 0x80 } else { 0 };
        let mut batch = Batch {
            tokens,
            chunks,
            tail,
            unsigned,
            xs: vec![Line([0; 64]); tokens * chunks * 8],
            dx: vec![0.0; tokens * chunks * CHUNK],
            sx: vec![0.0; tokens * chunks * CHUNK],
            tq: vec![0; tokens * tail * BLOCK],
            tscales: vec![0.0; tokens * tail * 8],
            tsums: vec![0.0; tokens * tail],
        };
        if chunks > 0 {
            (
                batch.xs.par_chunks_mut(chunks * 8),
                batch.dx.par_chunks_mut(chunks * CHUNK),
                batch.sx.par_chunks_mut(chunks * CHUNK),
            )
                .into_par_iter()
                .zip(x.par_chunks(kb))
                .for_each(|((xs, dx, sx), row)| {
                    let bytes = bytes_of(xs);
                    for (i, block) in row[..chunks * CHUNK].iter().enumerate() {
                        let (c, b) = (i / CHUNK, i % CHUNK);
                        for k in 0..8 {
                            let at = (c * 8 + k) * 64 + 4 * b;
                            for (o, &q) in bytes[at..at + 4].iter_mut().zip(&block.qs[4 * k..4 * k + 4]) {
                                *o = q as u8 ^ flip;
                            }
                        }
                        dx[i] = block.d;
                        sx[i] = block.s;
                    }
                });
        }
        if tail > 0 {
            for (t, row) in x.chunks_exact(kb).enumerate() {
                for (i, block) in row[chunks * CHUNK..].iter().enumerate() {
                    let at = (t * tail + i) * BLOCK;
                    for (o, &q) in batch.tq[at..at + BLOCK].iter_mut().zip(&block.qs) {
                        *o = q as u8 ^ flip;
                    }
                    batch.tscales[(t * tail + i) * 8..(t * tail + i + 1) * 8].fill(block.d);
                    batch.tsums[t * tail + i] = block.s;
                }
            }
        }
        batch
    }
}

/// Fetches the lines of the chunk [`super::PREFETCH_DISTANCE`] bytes ahead of the one at `base`
/// (the hardware prefetcher stops at page boundaries).
#[inline(always)]
fn prefetch_chunk(base: *const u8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        // SAFETY: prefetching does not fault, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(super::PREFETCH_DISTANCE + line) as *const i8) };
    }
}

/// Q4_1 row `r` × `N` tokens from `t0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_1_group<const N: usize>(w: &Packed, r: usize, batch: &Batch, t0: usize, out: &mut [f32; GROUP]) {
    let (chunks, tail) = (w.chunks, w.tail);
    let low_nibbles = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    // SAFETY (whole body): the caller checked that row `r` exists and the batch holds tokens
    // `t0..t0 + N` in this matrix's shape; every pointer below stays inside those.
    unsafe {
        let row = w.chunk_row(r);
        for c in 0..chunks {
            let base = row.add(c * chunk_bytes(WeightType::Q4_1));
            prefetch_chunk(base, chunk_bytes(WeightType::Q4_1));
            let mut q4 = [_mm512_setzero_si512(); 8];
            for g in 0..4 {
                let packed = _mm512_load_si512(base.add(64 * g) as *const __m512i);
                q4[g] = _mm512_and_si512(packed, low_nibbles);
                q4[g + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low_nibbles);
            }
            let dw = _mm512_cvtph_ps(_mm256_load_si256(base.add(256) as *const __m256i));
            let m = _mm512_cvtph_ps(_mm256_load_si256(base.add(288) as *const __m256i));
            for (j, acc) in acc.iter_mut().enumerate() {
                let at = (t0 + j) * chunks + c;
                let x = batch.xs.as_ptr().add(at * 8) as *const __m512i;
                // Two chains of four, so one token's sums do not wait on each other.
                let mut even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q4[0], _mm512_load_si512(x));
                let mut odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q4[1], _mm512_load_si512(x.add(1)));
                for k in (2..8).step_by(2) {
                    even = _mm512_dpbusd_epi32(even, q4[k], _mm512_load_si512(x.add(k)));
                    odd = _mm512_dpbusd_epi32(odd, q4[k + 1], _mm512_load_si512(x.add(k + 1)));
                }
                let sums = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
                let scaled = _mm512_mul_ps(sums, _mm512_loadu_ps(batch.dx.as_ptr().add(at * CHUNK)));
                *acc = _mm512_fmadd_ps(scaled, dw, *acc);
                *acc = _mm512_fmadd_ps(m, _mm512_loadu_ps(batch.sx.as_ptr().add(at * CHUNK)), *acc);
            }
        }
        let mut offsets = [0f32; N];
        let trow = w.tail_row(r);
        for p in 0..tail / 2 {
            let base = trow.add(p * 40);
            // Blocks 2p and 2p+1: [A, B] packed nibbles → [A & F, A >> 4, B & F, B >> 4].
            let packed = _mm256_set_m128i(
                _mm_loadu_si128(base.add(24) as *const __m128i),
                _mm_loadu_si128(base.add(4) as *const __m128i),
            );
            let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(packed), _mm256_srli_epi16::<4>(packed));
            let q4 = _mm512_and_si512(_mm512_shuffle_i64x2::<0b11_01_10_00>(both, both), low_nibbles);
            let (d0, m0) = super::two_f16(base);
            let (d1, m1) = super::two_f16(base.add(20));
            let dw = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
            for (j, acc) in acc.iter_mut().enumerate() {
                let at = (t0 + j) * tail + 2 * p;
                let x = _mm512_loadu_si512(batch.tq.as_ptr().add(at * BLOCK) as *const __m512i);
                let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q4, x);
                let scaled =
                    _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(batch.tscales.as_ptr().add(at * 8)));
                *acc = _mm512_fmadd_ps(scaled, dw, *acc);
                offsets[j] += m0 * batch.tsums[at] + m1 * batch.tsums[at + 1];
            }
        }
        for j in 0..N {
            out[j] = _mm512_reduce_add_ps(acc[j]) + offsets[j];
        }
    }
}

/// Q8_0 row `r` × `N` tokens from `t0`. `vpdpbusd` multiplies unsigned by signed bytes, so the
/// activations come offset by +128 and `128 × sum(w)` comes off again.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_group<const N: usize>(w: &Packed, r: usize, batch: &Batch, t0: usize, out: &mut [f32; GROUP]) {
    let (chunks, tail) = (w.chunks, w.tail);
    let mut acc = [_mm512_setzero_ps(); N];
    // SAFETY (whole body): as in `q4_1_group`.
    unsafe {
        let row = w.chunk_row(r);
        for c in 0..chunks {
            let base = row.add(c * chunk_bytes(WeightType::Q8_0));
            prefetch_chunk(base, chunk_bytes(WeightType::Q8_0));
            let q8: [__m512i; 8] = std::array::from_fn(|k| _mm512_load_si512(base.add(64 * k) as *const __m512i));
            let dw = _mm512_cvtph_ps(_mm256_load_si256(base.add(512) as *const __m256i));
            let correction =
                _mm512_slli_epi32::<7>(_mm512_cvtepi16_epi32(_mm256_load_si256(base.add(544) as *const __m256i)));
            for (j, acc) in acc.iter_mut().enumerate() {
                let at = (t0 + j) * chunks + c;
                let x = batch.xs.as_ptr().add(at * 8) as *const __m512i;
                let mut even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_load_si512(x), q8[0]);
                let mut odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_load_si512(x.add(1)), q8[1]);
                for k in (2..8).step_by(2) {
                    even = _mm512_dpbusd_epi32(even, _mm512_load_si512(x.add(k)), q8[k]);
                    odd = _mm512_dpbusd_epi32(odd, _mm512_load_si512(x.add(k + 1)), q8[k + 1]);
                }
                let sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(even, odd), correction));
                let scaled = _mm512_mul_ps(sums, _mm512_loadu_ps(batch.dx.as_ptr().add(at * CHUNK)));
                *acc = _mm512_fmadd_ps(scaled, dw, *acc);
            }
        }
        let ones = _mm512_set1_epi8(1);
        let trow = w.tail_row(r);
        for p in 0..tail / 2 {
            let base = trow.add(p * 68);
            let qw = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(base.add(2) as *const __m256i)),
                _mm256_loadu_si256(base.add(36) as *const __m256i),
            );
            let correction = _mm512_slli_epi32::<7>(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, qw));
            let (d0, _) = super::two_f16(base);
            let (d1, _) = super::two_f16(base.add(34));
            let dw = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
            for (j, acc) in acc.iter_mut().enumerate() {
                let at = (t0 + j) * tail + 2 * p;
                let x = _mm512_loadu_si512(batch.tq.as_ptr().add(at * BLOCK) as *const __m512i);
                let sums = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), x, qw), correction);
                let scaled =
                    _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(batch.tscales.as_ptr().add(at * 8)));
                *acc = _mm512_fmadd_ps(scaled, dw, *acc);
            }
        }
        for j in 0..N {
            out[j] = _mm512_reduce_add_ps(acc[j]);
        }
    }
}
