//! Vectorised math the model's element-wise steps share.

/// `gate[i] = silu(gate[i]) * up[i]`, the gated activation of the feed-forward layers.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::x86_supported() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        return unsafe { x86::silu_mul(gate, up) };
    }
    silu_mul_portable(gate, up);
}

/// `sum(e^(x[i] - shift))`: softmax's normaliser, for log-probabilities over a vocabulary.
pub fn sum_exp(x: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::x86_supported() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        return unsafe { x86::sum_exp(x, shift) };
    }
    x.iter().map(|v| (v - shift).exp()).sum()
}

fn silu_mul_portable(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sum_exp(x: &[f32], shift: f32) -> f32 {
        let mut eights = x.chunks_exact(8);
        let mut acc = _mm256_setzero_ps();
        for eight in &mut eights {
            // SAFETY: `eight` holds 8 values.
            let v = unsafe { _mm256_loadu_ps(eight.as_ptr()) };
            acc = _mm256_add_ps(acc, exp(_mm256_sub_ps(v, _mm256_set1_ps(shift))));
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().sum::<f32>() + eights.remainder().iter().map(|v| (v - shift).exp()).sum::<f32>()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        assert_eq!(gate.len(), up.len());
        let n = gate.len() - gate.len() % 8;
        for i in (0..n).step_by(8) {
            // SAFETY: `i + 8 <= n <= len` for both slices.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let sigmoid = _mm256_div_ps(
                    _mm256_set1_ps(1.0),
                    _mm256_add_ps(_mm256_set1_ps(1.0), exp(_mm256_sub_ps(_mm256_setzero_ps(), g))),
                );
                let out = _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up.as_ptr().add(i)));
                _mm256_storeu_ps(gate.as_mut_ptr().add(i), out);
            }
        }
        super::silu_mul_portable(&mut gate[n..], &up[n..]);
    }

    /// `e^x` for each lane (Cephes' single-precision polynomial, within 2 ulp; inputs below
    /// -87.3 come out as about 1e-38 rather than 0, which softmax cannot tell apart).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp(x: __m256) -> __m256 {
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
        if !crate::quant::x86_supported() {
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

    #[test]
    fn sum_exp_matches_the_scalar_sum() {
        let x: Vec<f32> = (0..1003).map(|i| (i % 97) as f32 * 0.3 - 20.0).collect();
        let want: f32 = x.iter().map(|v| (v - 9.0).exp()).sum();
        let got = sum_exp(&x, 9.0);
        assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
    }

    #[test]
    fn silu_mul_matches_the_formula() {
        let gate: Vec<f32> = (0..37).map(|i| i as f32 * 0.7 - 12.0).collect();
        let up: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.1).collect();
        let mut got = gate.clone();
        silu_mul(&mut got, &up);
        for ((g, u), v) in gate.iter().zip(&up).zip(&got) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!((v - want).abs() <= 1e-6 * want.abs().max(1.0), "silu({g}) * {u} = {v}, want {want}");
        }
    }
}
