//! Quantized weights and the kernels that multiply by them.
//!
//! Weights stay in their GGUF block formats, read straight from the memory-mapped file:
//! - Q4_1: blocks of 32 weights, `d: f16, m: f16, qs: [u8; 16]`; weight `i` is `d * q_i + m` with
//!   `q_i` the low nibble of `qs[i]` for `i < 16` and the high nibble of `qs[i - 16]` otherwise.
//! - Q8_0: blocks of 32 weights, `d: f16, qs: [i8; 32]`; weight `i` is `d * qs[i]`.
//!
//! Activations are quantized per token to [`BlockQ8`] (32 int8 values, their scale, and the scaled
//! sum that Q4_1's offset term needs), so each block product is one integer dot product:
//! `sum_i (d_w q_i + m)(d_x x_i) = d_w d_x sum_i q_i x_i + m (d_x sum_i x_i)`.
//!
//! Single-stream decode reads every weight once per token, so it is bound by memory bandwidth; the
//! kernels therefore work on the packed blocks directly (AVX2 where the CPU has it, portable code
//! otherwise) and a matrix product splits its output rows across the rayon pool.

use half::f16;
use rayon::prelude::*;

/// Values per quantization block, for every format here.
pub const BLOCK: usize = 32;

/// The weight formats the engine multiplies by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    Q4_1,
    Q8_0,
}

impl WeightType {
    /// Bytes per block of 32 weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            WeightType::Q4_1 => 20,
            WeightType::Q8_0 => 34,
        }
    }
}

/// One block of quantized activations.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(32))]
pub struct BlockQ8 {
    pub qs: [i8; BLOCK],
    /// Scale: value `i` is `d * qs[i]`.
    pub d: f32,
    /// `d * sum(qs)`, the factor Q4_1's offset multiplies.
    pub s: f32,
}

/// Quantizes `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks).
pub fn quantize_row(x: &[f32], out: &mut [BlockQ8]) {
    #[cfg(target_arch = "x86_64")]
    if x86::supported() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { quantize_row_avx2(x, out) };
    }
    quantize_row_generic(x, out);
}

/// [`quantize_row_generic`] with AVX2: a block's 32 values in four registers, its maximum by a
/// tree of `max`, rounding by `cvtps2dq` (ties to even, as the generic code), packed to bytes in
/// two steps. Same results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_avx2(x: &[f32], out: &mut [BlockQ8]) {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), out.len() * BLOCK);
    let sign = _mm256_set1_ps(-0.0);
    for (chunk, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        // SAFETY: `chunk` holds 32 floats and `block.qs` 32 bytes.
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(chunk.as_ptr().add(8 * i)));
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
            let s = _mm_hadd_epi32(s, s);
            let total = _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
            // packs work per 128-bit lane: [0 1 4 5 | 2 3 6 7] order of the 8-value groups, undone
            // by a permutation of 32-bit pieces.
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(block.qs.as_mut_ptr() as *mut __m256i, bytes);
            block.d = d;
            block.s = d * total as f32;
        }
    }
}

#[inline(always)]
fn quantize_row_generic(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * BLOCK);
    for (chunk, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        // Eight running maxima, so the loop vectorises.
        let mut lanes = [0f32; 8];
        for eight in chunk.chunks_exact(8) {
            for (m, v) in lanes.iter_mut().zip(eight) {
                *m = m.max(v.abs());
            }
        }
        let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in block.qs.iter_mut().zip(chunk) {
            // Ties to even, as the SIMD rounding instructions do.
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        block.d = d;
        block.s = d * sum as f32;
    }
}

/// Quantizes each of the `rows` rows of `x` (row-major, `k` columns) into `k / 32` blocks.
pub fn quantize_rows(x: &[f32], k: usize, out: &mut Vec<BlockQ8>) {
    let rows = x.len() / k;
    out.clear();
    out.resize(rows * k / BLOCK, BlockQ8::default());
    out.par_chunks_mut(k / BLOCK).zip(x.par_chunks(k)).for_each(|(o, row)| quantize_row(row, o));
}

/// A quantized matrix of `rows` output features by `cols` inputs, each row `cols / 32` blocks.
#[derive(Clone)]
pub struct QMatrix {
    pub wtype: WeightType,
    pub rows: usize,
    pub cols: usize,
    data: crate::gguf::Bytes,
    /// The rows repacked for the batch kernels, made once (see [`QMatrix::prepare`]).
    #[cfg(target_arch = "x86_64")]
    packed: std::sync::Arc<std::sync::OnceLock<x86::Packed>>,
}

impl QMatrix {
    pub fn new(wtype: WeightType, rows: usize, cols: usize, data: crate::gguf::Bytes) -> Self {
        debug_assert_eq!(data.len(), rows * cols / BLOCK * wtype.block_bytes());
        Self {
            wtype,
            rows,
            cols,
            data,
            #[cfg(target_arch = "x86_64")]
            packed: Default::default(),
        }
    }

    /// Repacks the weights for the batch kernels now, where the CPU has them, rather than at the
    /// first product (the loader calls this; the repacked copy is about the size of the file's).
    pub fn prepare(&self) {
        #[cfg(target_arch = "x86_64")]
        if kernels().batched.is_some() {
            self.packed();
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn packed(&self) -> &x86::Packed {
        self.packed.get_or_init(|| x86::Packed::new(self.wtype, &self.data, self.rows, self.cols / BLOCK))
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.wtype.block_bytes()
    }

    /// The packed blocks of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Row `r` as f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        let bb = self.wtype.block_bytes();
        for (b, out) in row.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
            let d = f16_at(b, 0);
            match self.wtype {
                WeightType::Q4_1 => {
                    let m = f16_at(b, 2);
                    for j in 0..16 {
                        out[j] = d * (b[4 + j] & 0x0F) as f32 + m;
                        out[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
                    }
                }
                WeightType::Q8_0 => {
                    for j in 0..BLOCK {
                        out[j] = d * (b[2 + j] as i8) as f32;
                    }
                }
            }
        }
    }

    /// `out[t][r] = dot(row r, x[t])` for each of the `x.len() / (cols / 32)` tokens in `x`.
    /// The result for a token does not depend on the other tokens in `x`.
    /// `out` is resized to tokens × rows (row-major by token).
    pub fn matmul(&self, x: &[BlockQ8], out: &mut Vec<f32>) {
        self.matmul_with(x, out, true);
    }

    /// [`QMatrix::matmul`] of several matrices with the same input width by the same
    /// activations, `outs[i]` from `matrices[i]`: one parallel pass where the batch kernels run,
    /// rather than one hand-off to the worker threads per matrix.
    pub fn matmul_all(matrices: &[&QMatrix], x: &[BlockQ8], outs: &mut [&mut Vec<f32>]) {
        assert_eq!(matrices.len(), outs.len());
        #[cfg(target_arch = "x86_64")]
        if let Some(batched) = kernels().batched {
            return batched_products(batched, matrices, x, outs);
        }
        for (m, out) in matrices.iter().zip(outs) {
            m.matmul(x, out);
        }
    }

    /// [`QMatrix::matmul`], with the batch kernels (where the CPU has them) or without.
    fn matmul_with(&self, x: &[BlockQ8], out: &mut Vec<f32>, batch_kernels: bool) {
        // Every token count goes through the same kernel where there is one for batches, so a
        // sequence's logits do not depend on what it is batched with (greedy decoding gives
        // the same text alone or beside others).
        #[cfg(target_arch = "x86_64")]
        if let Some(batched) = kernels().batched.filter(|_| batch_kernels) {
            return batched_products(batched, &[self], x, &mut [out]);
        }
        let kb = self.cols / BLOCK;
        let tokens = x.len() / kb;
        let dot = kernels().dot(self.wtype);
        out.clear();
        out.resize(tokens * self.rows, 0.0);
        // Work items of ROWS_PER_TASK output rows × all tokens.
        const ROWS_PER_TASK: usize = 32;
        if tokens == 1 {
            out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(task, chunk)| {
                let r0 = task * ROWS_PER_TASK;
                for (i, o) in chunk.iter_mut().enumerate() {
                    *o = dot(self.row(r0 + i), x);
                }
            });
            return;
        }
        // Without batch kernels: four tokens per unpacked weight block, into a transposed tile.
        let dot4 = kernels().dot_x4(self.wtype);
        let token = |t: usize| &x[t * kb..(t + 1) * kb];
        let mut transposed = vec![0f32; tokens * self.rows];
        transposed.par_chunks_mut(ROWS_PER_TASK * tokens).enumerate().for_each(|(task, tile)| {
            let r0 = task * ROWS_PER_TASK;
            for (i, row_out) in tile.chunks_exact_mut(tokens).enumerate() {
                let w = self.row(r0 + i);
                let mut quads = row_out.chunks_exact_mut(4);
                for (q, out4) in (&mut quads).enumerate() {
                    let t = q * 4;
                    out4.copy_from_slice(&dot4(w, [token(t), token(t + 1), token(t + 2), token(t + 3)]));
                }
                let done = tokens - quads.into_remainder().len();
                for (t, o) in row_out.iter_mut().enumerate().skip(done) {
                    *o = dot(w, token(t));
                }
            }
        });
        // Back to token-major, a group of tokens at a time so both sides stay cache-friendly.
        const GROUP: usize = 16;
        out.par_chunks_mut(GROUP * self.rows).enumerate().for_each(|(g, group)| {
            let t0 = g * GROUP;
            let n = group.len() / self.rows;
            for r in 0..self.rows {
                let column = &transposed[r * tokens + t0..r * tokens + t0 + n];
                for (j, v) in column.iter().enumerate() {
                    group[j * self.rows + r] = *v;
                }
            }
        });
    }
}

/// [`QMatrix::matmul_all`] with the batch kernels: tasks of two groups of 16 rows of one matrix ×
/// all tokens.
#[cfg(target_arch = "x86_64")]
fn batched_products(batched: x86::BatchKernels, matrices: &[&QMatrix], x: &[BlockQ8], outs: &mut [&mut Vec<f32>]) {
    const GROUPS_PER_TASK: usize = 2;
    let kb = matrices[0].cols / BLOCK;
    assert!(matrices.iter().all(|m| m.cols == matrices[0].cols));
    let tokens = x.len() / kb;
    let mut shared = Vec::with_capacity(matrices.len());
    let mut tasks = Vec::new();
    for (i, (m, out)) in matrices.iter().zip(outs.iter_mut()).enumerate() {
        // Every value is written below: only new room needs zeroing.
        out.resize(tokens * m.rows, 0.0);
        shared.push(SharedOut(out.as_mut_ptr()));
        tasks.extend((0..m.packed().groups().div_ceil(GROUPS_PER_TASK)).map(|task| (i, task)));
    }
    // Q8_0 takes the activations offset by +128; Q4_1 as they are.
    let offset = matrices.iter().any(|m| m.wtype == WeightType::Q8_0).then(|| x86::activations(WeightType::Q8_0, x));
    tasks.into_par_iter().for_each(|(i, task)| {
        let (m, out) = (matrices[i], &shared[i]);
        let (packed, rows) = (m.packed(), m.rows);
        let x = match (m.wtype, &offset) {
            (WeightType::Q8_0, Some(offset)) => &offset[..],
            _ => x,
        };
        let mut tile = [[0f32; x86::ROWS]; x86::GROUP];
        for t0 in (0..tokens).step_by(x86::GROUP) {
            let n = x86::GROUP.min(tokens - t0);
            for g in task * GROUPS_PER_TASK..packed.groups().min((task + 1) * GROUPS_PER_TASK) {
                batched.product(packed, g, x, t0, n, &mut tile);
                let (r0, valid) = (g * x86::ROWS, x86::ROWS.min(rows - g * x86::ROWS));
                for (j, values) in tile[..n].iter().enumerate() {
                    let to = (t0 + j) * rows + r0;
                    // SAFETY: `out` holds tokens × rows values and this writes rows
                    // `r0..r0 + valid` of token `t0 + j`, which only this task owns. A whole
                    // group is one fixed-size store, not a call to `memmove`.
                    unsafe {
                        if valid == x86::ROWS {
                            std::ptr::write_unaligned(out.0.add(to) as *mut [f32; x86::ROWS], *values);
                        } else {
                            std::ptr::copy_nonoverlapping(values.as_ptr(), out.0.add(to), valid);
                        }
                    }
                }
            }
        }
    });
}

/// The output of a batched product, written by the tasks that own disjoint rows of it.
struct SharedOut(*mut f32);
// SAFETY: each task writes only its own rows' elements (see `QMatrix::matmul`).
unsafe impl Sync for SharedOut {}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

type DotFn = fn(&[u8], &[BlockQ8]) -> f32;
/// One weight row against four tokens' activations: each weight block is unpacked once.
type Dot4Fn = fn(&[u8], [&[BlockQ8]; 4]) -> [f32; 4];

/// The dot-product kernels chosen for this CPU, once.
pub struct Kernels {
    pub name: &'static str,
    q4_1: DotFn,
    q8_0: DotFn,
    q4_1_x4: Dot4Fn,
    q8_0_x4: Dot4Fn,
    /// Kernels over a batch of tokens (AVX-512 VNNI), where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    batched: Option<x86::BatchKernels>,
}

impl Kernels {
    pub fn dot(&self, wtype: WeightType) -> DotFn {
        match wtype {
            WeightType::Q4_1 => self.q4_1,
            WeightType::Q8_0 => self.q8_0,
        }
    }

    pub fn dot_x4(&self, wtype: WeightType) -> Dot4Fn {
        match wtype {
            WeightType::Q4_1 => self.q4_1_x4,
            WeightType::Q8_0 => self.q8_0_x4,
        }
    }
}

/// The fastest kernels this CPU supports.
pub fn kernels() -> &'static Kernels {
    static KERNELS: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    KERNELS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if x86::supported() {
            // `MANTLE_KERNELS=avx2` keeps to the AVX2 kernels (for comparisons).
            let batched =
                x86::BatchKernels::detect().filter(|_| std::env::var("MANTLE_KERNELS").as_deref() != Ok("avx2"));
            return Kernels {
                name: if batched.is_some() { "avx2 + avx512-vnni batches" } else { "avx2" },
                q4_1: x86::dot_q4_1,
                q8_0: x86::dot_q8_0,
                q4_1_x4: x86::dot_q4_1_x4,
                q8_0_x4: x86::dot_q8_0_x4,
                batched,
            };
        }
        Kernels {
            name: "portable",
            q4_1: dot_q4_1_portable,
            q8_0: dot_q8_0_portable,
            q4_1_x4: |w, xs| xs.map(|x| dot_q4_1_portable(w, x)),
            q8_0_x4: |w, xs| xs.map(|x| dot_q8_0_portable(w, x)),
            #[cfg(target_arch = "x86_64")]
            batched: None,
        }
    })
}

/// Reference Q4_1 block dot product.
pub fn dot_q4_1_portable(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut sum = 0f32;
    for (b, xb) in w.chunks_exact(20).zip(x) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (b[4 + j] & 0x0F) as i32 * xb.qs[j] as i32;
            isum += (b[4 + j] >> 4) as i32 * xb.qs[j + 16] as i32;
        }
        sum += d * xb.d * isum as f32 + m * xb.s;
    }
    sum
}

/// Reference Q8_0 block dot product.
pub fn dot_q8_0_portable(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut sum = 0f32;
    for (b, xb) in w.chunks_exact(34).zip(x) {
        let d = f16_at(b, 0);
        let isum: i32 = (0..BLOCK).map(|j| (b[2 + j] as i8) as i32 * xb.qs[j] as i32).sum();
        sum += d * xb.d * isum as f32;
    }
    sum
}

/// Whether this CPU has AVX2, FMA and F16C, which the x86 kernels here and attention's need.
#[cfg(target_arch = "x86_64")]
pub(crate) fn x86_supported() -> bool {
    x86::supported()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 kernels (with F16C for the block scales): 32 int8 products per block in two instructions (`maddubs` multiplies unsigned
    //! by signed bytes into i16 pairs, `madd` widens to i32), scaled and accumulated in f32 lanes.
    use std::arch::x86_64::*;

    use super::BlockQ8;

    mod batch;
    pub use batch::{BatchKernels, GROUP, Packed, ROWS, activations};

    /// How far ahead of the current block to prefetch weights, in bytes.
    pub(super) const PREFETCH_DISTANCE: usize = 2048;

    /// The f16 at `p` and the one after it, as f32 (one `vcvtph2ps`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn two_f16(p: *const u8) -> (f32, f32) {
        // SAFETY: the caller passes a pointer to at least 4 readable bytes.
        let bits = unsafe { std::ptr::read_unaligned(p as *const i32) };
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    pub fn supported() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    pub fn dot_q4_1(w: &[u8], x: &[BlockQ8]) -> f32 {
        assert!(w.len() >= x.len() * 20);
        // SAFETY: `kernels()` selects this only when AVX2 and FMA are present; lengths checked above.
        unsafe { dot_q4_1_avx2(w, x) }
    }

    pub fn dot_q8_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        assert!(w.len() >= x.len() * 34);
        // SAFETY: as above.
        unsafe { dot_q8_0_avx2(w, x) }
    }

    pub fn dot_q4_1_x4(w: &[u8], xs: [&[BlockQ8]; 4]) -> [f32; 4] {
        let n = xs[0].len();
        assert!(w.len() >= n * 20 && xs.iter().all(|x| x.len() == n));
        // SAFETY: as above; all four activation rows have the weight row's block count.
        unsafe { dot_q4_1_x4_avx2(w, xs) }
    }

    pub fn dot_q8_0_x4(w: &[u8], xs: [&[BlockQ8]; 4]) -> [f32; 4] {
        let n = xs[0].len();
        assert!(w.len() >= n * 34 && xs.iter().all(|x| x.len() == n));
        // SAFETY: as above.
        unsafe { dot_q8_0_x4_avx2(w, xs) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_1_avx2(w: &[u8], x: &[BlockQ8]) -> f32 {
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut offsets = 0f32;
        for (i, xb) in x.iter().enumerate() {
            let b = &w[i * 20..i * 20 + 20];
            // Fetch a few cache lines ahead: rows are short, and the hardware prefetcher stops
            // at every page boundary of the mapped file.
            _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().wrapping_add(PREFETCH_DISTANCE) as *const i8);
            // SAFETY: `b` holds 20 bytes.
            let (d, m) = unsafe { two_f16(b.as_ptr()) };
            offsets += m * xb.s;
            // SAFETY: `b` holds 20 bytes, the 16 packed nibble bytes start at 4; `xb.qs` is 32 bytes.
            let packed = unsafe { _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i) };
            let q4 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low_nibbles);
            let q8 = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
            let products = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), _mm256_set1_ps(d * xb.d), acc);
        }
        unsafe { hsum(acc) + offsets }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q8_0_avx2(w: &[u8], x: &[BlockQ8]) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for (i, xb) in x.iter().enumerate() {
            let b = &w[i * 34..i * 34 + 34];
            _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().wrapping_add(PREFETCH_DISTANCE) as *const i8);
            // SAFETY: `b` holds 34 bytes; the second value read is the first two quants, unused.
            let (d, _) = unsafe { two_f16(b.as_ptr()) };
            // SAFETY: `b` holds 34 bytes, the 32 quants start at 2; `xb.qs` is 32 bytes.
            let qw = unsafe { _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i) };
            let qx = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
            // maddubs wants unsigned × signed: |w| × (x with w's sign).
            let products = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
            let products = _mm256_madd_epi16(products, ones);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), _mm256_set1_ps(d * xb.d), acc);
        }
        unsafe { hsum(acc) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_1_x4_avx2(w: &[u8], xs: [&[BlockQ8]; 4]) -> [f32; 4] {
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut offsets = [0f32; 4];
        for i in 0..xs[0].len() {
            let b = &w[i * 20..i * 20 + 20];
            _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().wrapping_add(PREFETCH_DISTANCE) as *const i8);
            // SAFETY: `b` holds 20 bytes; each activation block holds 32 quants.
            let (d, m) = unsafe { two_f16(b.as_ptr()) };
            let packed = unsafe { _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i) };
            let q4 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low_nibbles);
            for t in 0..4 {
                let xb = &xs[t][i];
                offsets[t] += m * xb.s;
                let q8 = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
                let products = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), _mm256_set1_ps(d * xb.d), acc[t]);
            }
        }
        // SAFETY: AVX2 is enabled for this function.
        [0, 1, 2, 3].map(|t| unsafe { hsum(acc[t]) } + offsets[t])
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q8_0_x4_avx2(w: &[u8], xs: [&[BlockQ8]; 4]) -> [f32; 4] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        for i in 0..xs[0].len() {
            let b = &w[i * 34..i * 34 + 34];
            _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().wrapping_add(PREFETCH_DISTANCE) as *const i8);
            // SAFETY: `b` holds 34 bytes; each activation block holds 32 quants.
            let (d, _) = unsafe { two_f16(b.as_ptr()) };
            let qw = unsafe { _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i) };
            let abs_w = _mm256_sign_epi8(qw, qw);
            for t in 0..4 {
                let xb = &xs[t][i];
                let qx = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
                let products = _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(qx, qw)), ones);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), _mm256_set1_ps(d * xb.d), acc[t]);
            }
        }
        // SAFETY: AVX2 is enabled for this function.
        [0, 1, 2, 3].map(|t| unsafe { hsum(acc[t]) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_token_kernels_equal_four_single_dots() {
        let mut seed = 19;
        let w4 = random_q4_1_row(18, &mut seed);
        let w8 = random_q8_0_row(18, &mut seed);
        let rows: Vec<Vec<BlockQ8>> = (0..4)
            .map(|_| {
                let mut q = vec![BlockQ8::default(); 18];
                quantize_row(&random_activations(18 * 32, &mut seed), &mut q);
                q
            })
            .collect();
        let xs = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
        let k = kernels();
        let singles4 = xs.map(|x| k.dot(WeightType::Q4_1)(&w4, x));
        let singles8 = xs.map(|x| k.dot(WeightType::Q8_0)(&w8, x));
        let close = |a: [f32; 4], b: [f32; 4]| a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-4 * y.abs().max(1.0));
        assert!(close(k.dot_x4(WeightType::Q4_1)(&w4, xs), singles4));
        assert!(close(k.dot_x4(WeightType::Q8_0)(&w8, xs), singles8));
    }

    /// Deterministic pseudo-random bytes and floats for kernel tests.
    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    fn random_q4_1_row(blocks: usize, seed: &mut u64) -> Vec<u8> {
        let mut row = Vec::new();
        for _ in 0..blocks {
            row.extend(f16::from_f32((lcg(seed) % 100) as f32 / 1000.0).to_le_bytes());
            row.extend(f16::from_f32(-((lcg(seed) % 100) as f32) / 500.0).to_le_bytes());
            row.extend((0..16).map(|_| lcg(seed) as u8));
        }
        row
    }

    fn random_q8_0_row(blocks: usize, seed: &mut u64) -> Vec<u8> {
        let mut row = Vec::new();
        for _ in 0..blocks {
            row.extend(f16::from_f32((lcg(seed) % 100) as f32 / 1000.0).to_le_bytes());
            row.extend((0..32).map(|_| ((lcg(seed) % 255) as i32 - 127) as i8 as u8));
        }
        row
    }

    fn random_activations(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n).map(|_| (lcg(seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn quantized_activations_round_trip_within_half_a_step() {
        let mut seed = 7;
        let x = random_activations(128, &mut seed);
        let mut q = vec![BlockQ8::default(); 4];
        quantize_row(&x, &mut q);
        for (block, chunk) in q.iter().zip(x.chunks(32)) {
            let sum: i32 = block.qs.iter().map(|&v| v as i32).sum();
            assert!((block.s - block.d * sum as f32).abs() < 1e-6);
            for (qv, v) in block.qs.iter().zip(chunk) {
                assert!((block.d * *qv as f32 - v).abs() <= block.d / 2.0 + 1e-6);
            }
        }
    }

    #[test]
    fn vectorised_quantization_equals_the_generic_code() {
        let mut seed = 23;
        let mut x = random_activations(32 * 40, &mut seed);
        // Exact ties (x = 0.5 steps when amax is 127): rounding must agree on them too.
        for (i, v) in x[..32].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { i as f32 + 0.5 - 16.0 };
        }
        x[32..64].fill(0.0);
        let (mut fast, mut generic) = (vec![BlockQ8::default(); 40], vec![BlockQ8::default(); 40]);
        quantize_row(&x, &mut fast);
        quantize_row_generic(&x, &mut generic);
        for (a, b) in fast.iter().zip(&generic) {
            assert_eq!((a.qs, a.d, a.s), (b.qs, b.d, b.s));
        }
    }

    #[test]
    fn q4_1_dot_matches_dequantized_float_dot() {
        let mut seed = 11;
        let w = random_q4_1_row(18, &mut seed);
        let x = random_activations(18 * 32, &mut seed);
        let mut q = vec![BlockQ8::default(); 18];
        quantize_row(&x, &mut q);
        let m = QMatrix::new(WeightType::Q4_1, 1, 18 * 32, crate::gguf::Bytes::from_vec(w.clone()));
        let mut wf = vec![0f32; 18 * 32];
        m.dequantize_row(0, &mut wf);
        let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
        let portable = dot_q4_1_portable(&w, &q);
        assert!((portable - exact).abs() < 0.02 * exact.abs().max(1.0), "{portable} vs {exact}");
        let fast = kernels().dot(WeightType::Q4_1)(&w, &q);
        assert!((fast - portable).abs() < 1e-3 * portable.abs().max(1.0), "{} {fast} vs {portable}", kernels().name);
    }

    #[test]
    fn q8_0_dot_matches_dequantized_float_dot() {
        let mut seed = 13;
        let w = random_q8_0_row(18, &mut seed);
        let x = random_activations(18 * 32, &mut seed);
        let mut q = vec![BlockQ8::default(); 18];
        quantize_row(&x, &mut q);
        let m = QMatrix::new(WeightType::Q8_0, 1, 18 * 32, crate::gguf::Bytes::from_vec(w.clone()));
        let mut wf = vec![0f32; 18 * 32];
        m.dequantize_row(0, &mut wf);
        let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
        let portable = dot_q8_0_portable(&w, &q);
        assert!((portable - exact).abs() < 0.02 * exact.abs().max(1.0), "{portable} vs {exact}");
        let fast = kernels().dot(WeightType::Q8_0)(&w, &q);
        assert!((fast - portable).abs() < 1e-3 * portable.abs().max(1.0), "{} {fast} vs {portable}", kernels().name);
    }

    /// Batched products (the AVX-512 VNNI kernels where the CPU has them, over groups of 8, 4 and
    /// single tokens) against the portable one-token dot product, for both weight formats.
    #[test]
    fn batched_matmul_equals_one_token_at_a_time() {
        let mut seed = 17;
        let rows = 70; // four groups of 16 and a part
        for (wtype, row) in
            [(WeightType::Q4_1, random_q4_1_row as fn(usize, &mut u64) -> Vec<u8>), (WeightType::Q8_0, random_q8_0_row)]
        {
            for cols in [32, 6 * 32, 18 * 32] {
                let w: Vec<u8> = (0..rows).flat_map(|_| row(cols / 32, &mut seed)).collect();
                let m = QMatrix::new(wtype, rows, cols, crate::gguf::Bytes::from_vec(w));
                for tokens in [2, 5, 8, 13, 16, 21] {
                    let x = random_activations(tokens * cols, &mut seed);
                    let mut q = Vec::new();
                    quantize_rows(&x, cols, &mut q);
                    let mut batched = Vec::new();
                    m.matmul(&q, &mut batched);
                    assert_eq!(batched.len(), tokens * rows);
                    // The AVX2 path that CPUs without the batch kernels take, on this one too.
                    let mut without = Vec::new();
                    m.matmul_with(&q, &mut without, false);
                    let kb = cols / 32;
                    for t in 0..tokens {
                        for r in 0..rows {
                            let x = &q[t * kb..(t + 1) * kb];
                            let expected = match wtype {
                                WeightType::Q4_1 => dot_q4_1_portable(m.row(r), x),
                                WeightType::Q8_0 => dot_q8_0_portable(m.row(r), x),
                            };
                            for (path, got) in
                                [(kernels().name, batched[t * rows + r]), ("avx2", without[t * rows + r])]
                            {
                                assert!(
                                    (got - expected).abs() <= 1e-4 * expected.abs().max(1.0),
                                    "{wtype:?} {path} tokens {tokens}, token {t} row {r}: {got} vs {expected}",
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
