// The lean decoder forward (see adaspec/model/decoder.py): one call runs every
// layer of a llama-family decoder for M fed tokens of one or more requests.
//
// Batch invariance by construction: every float operation that produces a
// row's result (its norms, quantization, dequantization, RoPE, attention over
// its visible keys, SiLU, residuals, LM head) is a fixed sequence that reads
// only that row and the keys it may see, whatever M, the request mix or the
// tree around it. Integer matmul accumulation is exact, so how the int8 GEMM
// blocks rows cannot change a row's result; the fp32 GEMM gives each output
// element its own fixed 8-lane FMA chain + fixed tree sum. No OpenMP reduction
// ever splits a row's sum. Compiled with -ffp-contract=off: every FMA is explicit.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t W = 8;                       // float lanes
int64_t g_parallel_min_work = 1 << 18;  // multiply-adds per GEMM (attention) below which one thread runs

constexpr int64_t kPrefetchGroups = 16;  // attention: how far ahead (8-key groups) keys and values are fetched

// K/V pool elements: float32, or float16 held as raw bits (uint16_t). A float16 entry is
// rounded once, to nearest even, when it is written (F16C), and every read widens it back
// exactly, so every forward that reads a slot sees the same value, whichever forward wrote it.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store_kv(float* p, float x) { *p = x; }
inline void store_kv(uint16_t* p, float x) { *p = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
inline void store_kv_row(float* p, const float* x, int64_t n) { std::memcpy(p, x, n * sizeof(float)); }
inline void store_kv_row(uint16_t* p, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) store_kv(p + i, x[i]);
}

// The int8 GEMM's instruction set, chosen once at load from what the CPU (and OS) offers:
// AVX-512 VNNI (vpdpbusd: u8 x s8 products summed four at a time into int32) where
// present, else AVX2 (maddubs + madd). Both sum the same integer products exactly, so
// the two give bitwise the same results. Each int8 Linear is packed for the ISA in use
// when it is made; set_gemm_isa chooses it for the Linears made after (tests, benchmarks).
bool cpu_has_vnni() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}
const bool g_has_vnni = cpu_has_vnni();
bool g_use_vnni = g_has_vnni;

#define ADASPEC_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

inline float tree_sum(__m256 v) {  // fixed order: ((p0+p4)+(p2+p6)) + ((p1+p5)+(p3+p7))
  alignas(32) float p[8];
  _mm256_store_ps(p, v);
  const float a0 = p[0] + p[4], a1 = p[1] + p[5], a2 = p[2] + p[6], a3 = p[3] + p[7];
  return (a0 + a2) + (a1 + a3);
}

inline int32_t hsum_i32(__m256i v) {  // integer: order is irrelevant
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// exp(x) lane by lane (Cephes expf polynomial), x clamped to [-87, 88].
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

template <typename F>
void maybe_parallel(bool parallel, int64_t n, const F& f) {
  if (parallel && at::get_num_threads() > 1) at::parallel_for(0, n, 1, f); else f(0, n);
}

// ------------------------------------------------------------------ linear layers

// One linear layer y = x W^T (+ bias), int8 (per-row activation scale, per-channel
// weight scale, as adaspec.quant.Int8Linear) or fp32.
struct Linear {
  int64_t N = 0, K = 0, Kp = 0;  // Kp: K rounded up to 32 (int8 rows are zero padded)
  bool int8 = false;
  bool wide = false;  // |w| > 64: int16 pair sums could saturate, use the exact int16 path
  bool vnni = false;  // packed for the AVX-512 VNNI GEMM (set_gemm_isa at creation), else for AVX2
  float q_max = 127.0f;
  at::Tensor w;           // int8, packed (see make_linear), or float32 [N, K]
  at::Tensor w_scale;     // float32 [N] (VNNI: [Np], zero padded)
  at::Tensor w_sum;       // int32 [Np]: 128 * sum_k w[n][k], the VNNI path's u8 offset (int8 only)
  at::Tensor bias_p;      // VNNI: float32 [Np], bias or zeros
  at::Tensor bias;        // float32 [N] or undefined
  at::Tensor inv_smooth;  // float32 [K] or undefined: input multiplied by it first
};

Linear make_linear(at::Tensor w, at::Tensor w_scale, c10::optional<at::Tensor> bias,
                   c10::optional<at::Tensor> inv_smooth, int64_t activation_bits) {
  Linear L;
  TORCH_CHECK(w.dim() == 2, "weight must be [N, K]");
  L.N = w.size(0);
  L.K = w.size(1);
  TORCH_CHECK(L.K % W == 0, "in_features must be a multiple of 8");
  if (w.scalar_type() == at::kChar) {
    L.int8 = true;
    L.Kp = (L.K + 31) / 32 * 32;
    w = w.contiguous();
    const int8_t* wp = w.data_ptr<int8_t>();
    const int64_t N = L.N, K = L.K, Kp = L.Kp;
    int wmax = 0;  // max |w|, exact in any order
    for (int64_t i = 0; i < N * K; ++i) wmax = std::max(wmax, std::abs(static_cast<int>(wp[i])));
    L.wide = wmax > 64;
    TORCH_CHECK(w_scale.numel() == L.N, "w_scale must be [N]");
    L.w_scale = w_scale.to(at::kFloat).contiguous();
    L.vnni = g_use_vnni;
    if (L.vnni) {
      // packed for the VNNI GEMM: [Np/32 tiles][Kp/4 groups][32 columns][4 bytes]: one
      // contiguous stream per tile of 32 output columns; a 64-byte load holds 4 consecutive
      // k of 16 columns, one per int32 lane (columns past N are zero and ignored).
      // Written directly (no padded or widened copies: a large LM head's int32 copy
      // was most of the peak memory of a start-up).
      const int64_t Np = (N + 31) / 32 * 32;
      L.w = at::zeros({Np / 32, Kp / 4, 32, 4}, w.options());
      L.w_sum = at::zeros({Np}, at::kInt);
      int8_t* dst = L.w.data_ptr<int8_t>();
      int32_t* wsum = L.w_sum.data_ptr<int32_t>();
      at::parallel_for(0, Np / 32, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t c = 0; c < 32 && t * 32 + c < N; ++c) {
            const int8_t* row = wp + (t * 32 + c) * K;
            int8_t* out = dst + (t * (Kp / 4) * 32 + c) * 4;
            int32_t sum = 0;
            for (int64_t k = 0; k < K; ++k) {
              out[(k / 4) * 128 + (k % 4)] = row[k];
              sum += row[k];
            }
            wsum[t * 32 + c] = sum * 128;  // 128 * sum_k w[n][k], the u8 offset's correction
          }
      });
      L.w_scale = at::zeros({Np}, at::kFloat);
      L.w_scale.narrow(0, 0, L.N).copy_(w_scale.to(at::kFloat));
      L.bias_p = at::zeros({Np}, at::kFloat);
      if (bias.has_value() && bias->defined()) L.bias_p.narrow(0, 0, L.N).copy_(bias->to(at::kFloat));
    } else {
      // packed for the AVX2 GEMM: [ceil(N/4) tiles][Kp/32 chunks][4 rows][32 bytes], one
      // contiguous stream per tile (rows past N are zero and ignored)
      const int64_t ntiles = (L.N + 3) / 4;
      at::Tensor padded = at::zeros({ntiles * 4, L.Kp}, w.options());
      padded.narrow(1, 0, L.K).narrow(0, 0, L.N).copy_(w);
      L.w = padded.view({ntiles, 4, L.Kp / 32, 32}).permute({0, 2, 1, 3}).contiguous();
    }
    TORCH_CHECK(activation_bits == 7 || activation_bits == 8, "activation bits must be 7 or 8");
    L.q_max = static_cast<float>((1 << (activation_bits - 1)) - 1);
  } else {
    TORCH_CHECK(w.scalar_type() == at::kFloat, "weight must be int8 or float32");
    L.Kp = L.K;
    L.w = w.contiguous();
  }
  if (bias.has_value() && bias->defined()) L.bias = bias->to(at::kFloat).contiguous();
  if (inv_smooth.has_value() && inv_smooth->defined()) L.inv_smooth = inv_smooth->to(at::kFloat).contiguous();
  return L;
}

// Per-row activation quantization, as Int8Linear: s = max(max|x|, 1e-30) / q_max,
// x_q = round_half_even(x / s) in [-q_max, q_max] (Int8Linear adds a zero point of
// q_max + 1 for fbgemm's u8 and subtracts it again: the same integer dot product).
// Padding columns hold 0.
void quantize_rows(const Linear& L, const float* x, int64_t ldx, int64_t M, int8_t* xq, float* scales,
                   float* tmp) {
  const float* smooth = L.inv_smooth.defined() ? L.inv_smooth.data_ptr<float>() : nullptr;
  const int64_t K = L.K, Kp = L.Kp;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    if (smooth) {
      for (int64_t k = 0; k < K; k += W)
        _mm256_storeu_ps(tmp + k, _mm256_mul_ps(_mm256_loadu_ps(xr + k), _mm256_loadu_ps(smooth + k)));
      xr = tmp;
    }
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += W) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)));
    alignas(32) float p[8];
    _mm256_store_ps(p, mx);
    float amax = p[0];
    for (int i = 1; i < 8; ++i) amax = std::max(amax, p[i]);  // max: exact in any order
    const float s = std::max(amax, 1e-30f) / L.q_max;
    scales[m] = s;
    const __m256 vs = _mm256_set1_ps(s);
    const __m256 lo = _mm256_set1_ps(-L.q_max), hi = _mm256_set1_ps(L.q_max);
    int8_t* q = xq + m * Kp;
    for (int64_t k = 0; k < K; k += W) {
      __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
      const __m256i vi = _mm256_cvtps_epi32(v);  // 8 x int32 -> 8 x int8
      const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(vi), _mm256_extracti128_si256(vi, 1));
      const __m128i w8 = _mm_packs_epi16(w16, w16);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), w8);
    }
    for (int64_t k = K; k < Kp; ++k) q[k] = 0;
  }
}

// acc[i][j] = sum_k xq[i][k] * w_j[k] for MR rows and the 4 weight rows of a packed tile,
// exactly, for |w| <= 64 and |x| <= 127: maddubs(|w|, sign(x, w)) sums pairs to at most
// 2 * 64 * 127 = 16256, so two chunks' pair sums add in int16 without saturation (one
// madd per 64 bytes instead of per 32: the multiply ports are the bottleneck at M > 1).
template <int MR>
inline void tile_s8(const int8_t* x, int64_t ldx, const int8_t* wt, int64_t Kp, int32_t* out, int64_t ldo) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 64 <= Kp; k += 64) {
    const int8_t* wc = wt + k * 4;  // chunks k / 32 and k / 32 + 1: 4 rows x 32 bytes each
    _mm_prefetch(reinterpret_cast<const char*>(wc + 1024), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wc + 1088), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wc + 1152), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wc + 1216), _MM_HINT_T0);
    for (int j = 0; j < 4; ++j) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + j * 32));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + 128 + j * 32));
      const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
      for (int i = 0; i < MR; ++i) {
        const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * ldx + k));
        const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * ldx + k + 32));
        const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(a0, w0)),
                                           _mm256_maddubs_epi16(u1, _mm256_sign_epi8(a1, w1)));
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(t, ones));
      }
    }
  }
  if (k < Kp) {  // Kp % 64 == 32: one chunk left
    const int8_t* wc = wt + k * 4;
    for (int j = 0; j < 4; ++j) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + j * 32));
      const __m256i u0 = _mm256_abs_epi8(w0);
      for (int i = 0; i < MR; ++i) {
        const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * ldx + k));
        acc[i][j] = _mm256_add_epi32(acc[i][j],
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(a0, w0)), ones));
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) out[i * ldo + j] = hsum_i32(acc[i][j]);
}

// The exact path for wide weights (|w| > 64): both operands sign-extended to int16.
template <int MR>
inline void tile_s8_wide(const int8_t* x, int64_t ldx, const int8_t* wt, int64_t Kp, int32_t* out,
                         int64_t ldo) {
  __m256i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < Kp; k += 16) {
    __m256i wv[4];
    const int8_t* wc = wt + (k / 32) * 128 + (k % 32);  // half of chunk k / 32
    for (int j = 0; j < 4; ++j)
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wc + j * 32)));
    for (int i = 0; i < MR; ++i) {
      const __m256i a = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i * ldx + k)));
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(a, wv[j]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) out[i * ldo + j] = hsum_i32(acc[i][j]);
}

// out[i][j] = tree_sum(8-lane FMA chain over k) for fp32 weights.
template <int MR>
inline void tile_f32(const float* x, int64_t ldx, const float* const* w, int64_t K, float* out, int64_t ldo) {
  __m256 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += W) {
    __m256 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm256_loadu_ps(w[j] + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_fmadd_ps(a, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) out[i * ldo + j] = tree_sum(acc[i][j]);
}

// The AVX-512 VNNI GEMM over one tile of 32 output columns for MR rows, exactly:
// y[i][n] = ((float(sum_k xq[i][k] w[n][k]) * w_scale[n]) * s[i]) + bias[n], the same
// operations per element as the AVX2 path. xu holds xq + 128 as u8 (vpdpbusd multiplies
// u8 by s8, four products summed into each int32 lane); 128 * sum_k w[n][k] is taken
// off after. A 64-byte load holds k .. k+3 of 16 columns, one column per lane, against
// the row's 4 activation bytes broadcast: no horizontal sum. |sum| <= K * 255 * 128
// fits int32 for K < 65793.
template <int MR>
ADASPEC_VNNI inline void tile_vnni(const uint8_t* x, int64_t ldx, const int8_t* wt, int64_t Kp, const int32_t* wsum,
                                   const float* ws, const float* bias, const float* scales, float* y, int64_t ldy,
                                   int64_t nn) {
  __m512i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
  for (int64_t k = 0; k < Kp; k += 4) {
    const int8_t* wc = wt + k * 32;  // group k / 4: 32 columns x 4 bytes
    _mm_prefetch(reinterpret_cast<const char*>(wc + 2048), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wc + 2112), _MM_HINT_T0);
    const __m512i w0 = _mm512_loadu_si512(wc), w1 = _mm512_loadu_si512(wc + 64);
    for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, x + i * ldx + k, 4);
      const __m512i a = _mm512_set1_epi32(a4);
      acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], a, w0);
      acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], a, w1);
    }
  }
  const __mmask16 m0 = nn >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nn) - 1);
  const __mmask16 m1 = nn >= 32 ? 0xFFFF : (nn <= 16 ? 0 : static_cast<__mmask16>((1u << (nn - 16)) - 1));
  for (int h = 0; h < 2; ++h) {
    const __m512i off = _mm512_loadu_si512(wsum + 16 * h);
    const __m512 wsv = _mm512_loadu_ps(ws + 16 * h);
    const __m512 bv = bias ? _mm512_loadu_ps(bias + 16 * h) : _mm512_setzero_ps();
    const __mmask16 mk = h ? m1 : m0;
    for (int i = 0; i < MR; ++i) {
      __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][h], off));
      v = _mm512_mul_ps(v, wsv);
      v = _mm512_mul_ps(v, _mm512_set1_ps(scales[i]));
      if (bias) v = _mm512_add_ps(v, bv);  // as Int8Linear: (acc * w_scale) * s + bias
      _mm512_mask_storeu_ps(y + i * ldy + 16 * h, mk, v);
    }
  }
}

// y [M, N] for tiles [t0, t1) of 32 columns: rows 8 at a time against each tile.
ADASPEC_VNNI void gemm_vnni(const Linear& L, const uint8_t* xu, const float* scales, int64_t M, float* y, int64_t ldy,
                            int64_t t0, int64_t t1) {
  const int64_t Kp = L.Kp;
  const int8_t* wp = L.w.data_ptr<int8_t>();
  const int32_t* wsum = L.w_sum.data_ptr<int32_t>();
  const float* ws = L.w_scale.data_ptr<float>();
  const float* bias = L.bias.defined() ? L.bias_p.data_ptr<float>() : nullptr;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * 32, nn = std::min<int64_t>(32, L.N - n0);
    const int8_t* w = wp + t * 32 * Kp;
    const float* bt = bias ? bias + n0 : nullptr;
    for (int64_t m = 0; m < M; m += 8) {
      const int64_t mr = std::min<int64_t>(8, M - m);
      const uint8_t* xr = xu + m * Kp;
      float* yr = y + m * ldy + n0;
      switch (mr) {
#define ADASPEC_TILE(R) case R: tile_vnni<R>(xr, Kp, w, Kp, wsum + n0, ws + n0, bt, scales + m, yr, ldy, nn); break;
        ADASPEC_TILE(8) ADASPEC_TILE(7) ADASPEC_TILE(6) ADASPEC_TILE(5)
        ADASPEC_TILE(4) ADASPEC_TILE(3) ADASPEC_TILE(2) ADASPEC_TILE(1)
#undef ADASPEC_TILE
      }
    }
  }
}

// y [M, N] = linear(x [M, K]); scratch holds at least M * (Kp + 4 * N + K) + M bytes-worth of floats.
// Weights are walked in tiles of 4 output rows; each tile is read from memory
// once and reused from L1 for every pair of activation rows.
void linear_forward(const Linear& L, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy) {
  const int64_t N = L.N, Kp = L.Kp;
  const int64_t ntiles = (N + 3) / 4;
  const bool par = M * N * L.K >= g_parallel_min_work;
  if (L.int8) {
    std::vector<int8_t> xq(M * Kp);
    std::vector<float> scales(M), tmp(L.K);
    quantize_rows(L, x, ldx, M, xq.data(), scales.data(), tmp.data());
    if (L.vnni) {  // xq + 128 as u8, in place (padding columns: 128 against zero weights)
      uint8_t* xu = reinterpret_cast<uint8_t*>(xq.data());
      for (int64_t i = 0; i < M * Kp; ++i) xu[i] ^= 0x80u;
      const int64_t nt = (N + 31) / 32;
      maybe_parallel(par, nt, [&](int64_t t0, int64_t t1) { gemm_vnni(L, xu, scales.data(), M, y, ldy, t0, t1); });
      return;
    }
    const int8_t* wp = L.w.data_ptr<int8_t>();
    const float* ws = L.w_scale.data_ptr<float>();
    const float* bias = L.bias.defined() ? L.bias.data_ptr<float>() : nullptr;
    maybe_parallel(par, ntiles, [&](int64_t t0, int64_t t1) {
      int32_t acc[2 * 4];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * 4;
        const int8_t* w = wp + t * 4 * Kp;  // this tile's packed rows
        const int64_t nn = std::min<int64_t>(4, N - n0);
        for (int64_t m = 0; m < M; m += 2) {
          const int64_t mr = std::min<int64_t>(2, M - m);
          if (mr == 2) {
            if (L.wide) tile_s8_wide<2>(xq.data() + m * Kp, Kp, w, Kp, acc, 4);
            else tile_s8<2>(xq.data() + m * Kp, Kp, w, Kp, acc, 4);
          } else {
            if (L.wide) tile_s8_wide<1>(xq.data() + m * Kp, Kp, w, Kp, acc, 4);
            else tile_s8<1>(xq.data() + m * Kp, Kp, w, Kp, acc, 4);
          }
          for (int64_t i = 0; i < mr; ++i) {
            const float s = scales[m + i];
            float* yr = y + (m + i) * ldy;
            for (int64_t j = 0; j < nn; ++j) {
              const int64_t n = n0 + j;
              // as Int8Linear: (acc * w_scale) * s + bias
              float v = static_cast<float>(acc[i * 4 + j]) * ws[n];
              v = v * s;
              if (bias) v = v + bias[n];
              yr[n] = v;
            }
          }
        }
      }
    });
  } else {
    const float* wp = L.w.data_ptr<float>();
    const float* bias = L.bias.defined() ? L.bias.data_ptr<float>() : nullptr;
    const float* smooth = L.inv_smooth.defined() ? L.inv_smooth.data_ptr<float>() : nullptr;
    std::vector<float> xs;
    if (smooth) {
      xs.resize(M * L.K);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < L.K; ++k) xs[m * L.K + k] = x[m * ldx + k] * smooth[k];
      x = xs.data();
      ldx = L.K;
    }
    maybe_parallel(par, ntiles, [&](int64_t t0, int64_t t1) {
      float acc[2 * 4];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * 4;
        const float* w[4];
        for (int j = 0; j < 4; ++j) w[j] = wp + std::min(n0 + j, N - 1) * L.K;
        const int64_t nn = std::min<int64_t>(4, N - n0);
        for (int64_t m = 0; m < M; m += 2) {
          const int64_t mr = std::min<int64_t>(2, M - m);
          if (mr == 2) tile_f32<2>(x + m * ldx, ldx, w, L.K, acc, 4);
          else tile_f32<1>(x + m * ldx, ldx, w, L.K, acc, 4);
          for (int64_t i = 0; i < mr; ++i)
            for (int64_t j = 0; j < nn; ++j)
              y[(m + i) * ldy + n0 + j] = bias ? acc[i * 4 + j] + bias[n0 + j] : acc[i * 4 + j];
        }
      }
    });
  }
}

// ------------------------------------------------------------------ elementwise, row by row

void rmsnorm_rows(const float* x, const float* w, float eps, int64_t M, int64_t H, float* y) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * H;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < H; k += W) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    const float mean = tree_sum(acc) / static_cast<float>(H);
    const float r = 1.0f / std::sqrt(mean + eps);
    const __m256 vr = _mm256_set1_ps(r);
    for (int64_t k = 0; k < H; k += W)
      _mm256_storeu_ps(y + m * H + k, _mm256_mul_ps(_mm256_loadu_ps(w + k), _mm256_mul_ps(_mm256_loadu_ps(xr + k), vr)));
  }
}

// HF's q * cos + rotate_half(q) * sin, head by head; cos/sin rows by position.
void rope_heads(float* x, int64_t ld, int64_t nheads, int64_t D, const float* cos, const float* sin) {
  const int64_t h2 = D / 2;
  for (int64_t h = 0; h < nheads; ++h) {
    float* v = x + h * D;
    float tmp[512];
    std::memcpy(tmp, v, D * sizeof(float));
    for (int64_t i = 0; i < h2; ++i) v[i] = tmp[i] * cos[i] + (-tmp[i + h2]) * sin[i];
    for (int64_t i = h2; i < D; ++i) v[i] = tmp[i] * cos[i] + tmp[i - h2] * sin[i];
  }
  (void)ld;
}

// ------------------------------------------------------------------ the model

struct Layer {
  at::Tensor ln1, ln2;  // [H]
  Linear qkv, o, gate_up, down;
};

class LeanModel {
 public:
  LeanModel(int64_t hidden, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t intermediate,
            double eps, int64_t block_size, at::Tensor rope_cos, at::Tensor rope_sin, at::Tensor embed)
      : H_(hidden), Hq_(n_heads), Hkv_(n_kv_heads), D_(head_dim), I_(intermediate), eps_(static_cast<float>(eps)),
        B_(block_size), cos_(rope_cos.contiguous()), sin_(rope_sin.contiguous()), embed_(embed.contiguous()) {
    TORCH_CHECK(D_ % W == 0 && D_ <= 512, "head dim must be a multiple of 8, at most 512");
    TORCH_CHECK(H_ % W == 0 && I_ % W == 0, "hidden and intermediate sizes must be multiples of 8");
    TORCH_CHECK(Hq_ % Hkv_ == 0, "heads must be a multiple of kv heads");
    TORCH_CHECK(B_ % W == 0 && (B_ & (B_ - 1)) == 0, "block size must be a power of two, at least 8");
    while ((int64_t{1} << Bshift_) < B_) ++Bshift_;
    Bmask_ = B_ - 1;
  }

  void add_layer(at::Tensor ln1, const Linear& qkv, const Linear& o, at::Tensor ln2, const Linear& gate_up,
                 const Linear& down) {
    TORCH_CHECK(qkv.N == (Hq_ + 2 * Hkv_) * D_ && qkv.K == H_, "qkv shape");
    TORCH_CHECK(o.N == H_ && o.K == Hq_ * D_, "o_proj shape");
    TORCH_CHECK(gate_up.N == 2 * I_ && gate_up.K == H_, "gate_up shape");
    TORCH_CHECK(down.N == H_ && down.K == I_, "down shape");
    layers_.push_back(Layer{ln1.to(at::kFloat).contiguous(), ln2.to(at::kFloat).contiguous(), qkv, o, gate_up, down});
  }

  void set_head(at::Tensor final_norm, const Linear& lm_head) {
    norm_ = final_norm.to(at::kFloat).contiguous();
    head_ = lm_head;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // token_ids [M] int64, positions [M] int64 (RoPE positions), req_rows [Q+1] int64
  // (rows of request q: req_rows[q] .. req_rows[q+1]-1), req_prefix [Q] int64 (cached
  // keys before its fed tokens; fed token i of request q goes to slot prefix + i),
  // block_table [Q, NBmax] int64 (pool block of each block of B slots),
  // vis_ptr [M+1] / vis_idx [nnz] int64: per row, the fed indices (within its request)
  // it attends to besides the prefix, increasing, ending with its own;
  // k_pool [L, NB, Hkv, B/8, D, 8] and v_pool [L, NB, Hkv, B, D], both float32 or both float16;
  // logit_rows [R] int64. Returns {logits [R, V], hidden [R, H] after the final norm}.
  std::vector<at::Tensor> forward(at::Tensor token_ids, at::Tensor positions, at::Tensor req_rows,
                                  at::Tensor req_prefix, at::Tensor block_table, at::Tensor vis_ptr,
                                  at::Tensor vis_idx, at::Tensor k_pool, at::Tensor v_pool, at::Tensor logit_rows,
                                  bool compute_logits) {
    const int64_t M = token_ids.numel();
    const int64_t L = num_layers();
    TORCH_CHECK(L > 0 && norm_.defined(), "model not built");
    TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() &&
                (k_pool.scalar_type() == at::kFloat || k_pool.scalar_type() == at::kHalf) &&
                v_pool.scalar_type() == k_pool.scalar_type(), "pools: contiguous, both float32 or both float16");
    const bool kv16 = k_pool.scalar_type() == at::kHalf;
    TORCH_CHECK(k_pool.size(0) == L && k_pool.size(2) == Hkv_ && v_pool.size(3) == B_ && v_pool.size(4) == D_,
                "pool shape");
    const int64_t* ids = token_ids.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t max_pos = cos_.size(0);
    const int64_t V = embed_.size(0);
    for (int64_t m = 0; m < M; ++m) {
      TORCH_CHECK(ids[m] >= 0 && ids[m] < V, "token id out of range");
      TORCH_CHECK(pos[m] >= 0 && pos[m] < max_pos, "position out of range");
    }
    const int64_t Nqkv = (Hq_ + 2 * Hkv_) * D_;
    auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor h = at::empty({M, H_}, opts);        // residual stream
    at::Tensor xn = at::empty({M, H_}, opts);       // normed
    at::Tensor qkv = at::empty({M, Nqkv}, opts);
    at::Tensor att = at::empty({M, Hq_ * D_}, opts);
    at::Tensor tmp = at::empty({M, std::max(H_, 2 * I_)}, opts);
    at::Tensor act = at::empty({M, I_}, opts);
    float *hp = h.data_ptr<float>(), *xp = xn.data_ptr<float>(), *qp = qkv.data_ptr<float>();
    float *ap = att.data_ptr<float>(), *tp = tmp.data_ptr<float>(), *actp = act.data_ptr<float>();
    const float* ep = embed_.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) std::memcpy(hp + m * H_, ep + ids[m] * H_, H_ * sizeof(float));
    const float *cp = cos_.data_ptr<float>(), *sp = sin_.data_ptr<float>();
    for (int64_t l = 0; l < L; ++l) {
      const Layer& ly = layers_[l];
      rmsnorm_rows(hp, ly.ln1.data_ptr<float>(), eps_, M, H_, xp);
      linear_forward(ly.qkv, xp, H_, M, qp, Nqkv);
      for (int64_t m = 0; m < M; ++m) {  // RoPE on q and k heads
        rope_heads(qp + m * Nqkv, Nqkv, Hq_ + Hkv_, D_, cp + pos[m] * D_, sp + pos[m] * D_);
      }
      auto write_and_attend = [&](auto* kp, auto* vp) {  // kp, vp: float* or uint16_t* (float16 bits)
        write_kv(l, qp, Nqkv, req_rows, req_prefix, block_table, k_pool.size(1), kp, vp);
        attention(l, qp, Nqkv, ap, req_rows, req_prefix, block_table, vis_ptr, vis_idx, k_pool.size(1),
                  static_cast<const std::remove_pointer_t<decltype(kp)>*>(kp),
                  static_cast<const std::remove_pointer_t<decltype(vp)>*>(vp));
      };
      if (kv16) write_and_attend(reinterpret_cast<uint16_t*>(k_pool.data_ptr<at::Half>()),
                                 reinterpret_cast<uint16_t*>(v_pool.data_ptr<at::Half>()));
      else write_and_attend(k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
      linear_forward(ly.o, ap, Hq_ * D_, M, tp, H_);
      add_rows(hp, tp, M * H_);
      rmsnorm_rows(hp, ly.ln2.data_ptr<float>(), eps_, M, H_, xp);
      linear_forward(ly.gate_up, xp, H_, M, tp, 2 * I_);
      silu_mul(tp, 2 * I_, M, actp);
      linear_forward(ly.down, actp, I_, M, tp, H_);
      add_rows(hp, tp, M * H_);
    }
    const int64_t R = logit_rows.numel();
    const int64_t* lr = logit_rows.data_ptr<int64_t>();
    at::Tensor hsel = at::empty({R, H_}, opts);
    float* hs = hsel.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r) {
      TORCH_CHECK(lr[r] >= 0 && lr[r] < M, "logit row out of range");
      std::memcpy(hs + r * H_, hp + lr[r] * H_, H_ * sizeof(float));
    }
    at::Tensor hidden = at::empty({R, H_}, opts);
    rmsnorm_rows(hs, norm_.data_ptr<float>(), eps_, R, H_, hidden.data_ptr<float>());
    at::Tensor logits;
    if (compute_logits) {
      logits = at::empty({R, head_.N}, opts);
      linear_forward(head_, hidden.data_ptr<float>(), H_, R, logits.data_ptr<float>(), head_.N);
    } else {
      logits = at::empty({R, 0}, opts);
    }
    return {logits, hidden};
  }

  // Bytes of weights one forward reads (every linear layer once, unpadded; int8 1 byte, fp32 4).
  int64_t weight_bytes() const {
    auto b = [](const Linear& L) { return L.N * L.K * (L.int8 ? 1 : 4) + (L.int8 ? L.N * 4 : 0); };
    int64_t total = head_.N ? b(head_) : 0;
    for (const Layer& ly : layers_) total += b(ly.qkv) + b(ly.o) + b(ly.gate_up) + b(ly.down);
    return total;
  }

  // Every linear layer once over M rows of zeros-free input: the matmul floor.
  void matmuls_only(int64_t M) {
    const int64_t Nqkv = (Hq_ + 2 * Hkv_) * D_;
    at::Tensor x = at::randn({M, std::max({H_, I_, Hq_ * D_})});
    at::Tensor y = at::empty({M, std::max({Nqkv, 2 * I_, head_.N})});
    float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>();
    const int64_t ldx = x.size(1), ldy = y.size(1);
    for (const Layer& ly : layers_) {
      linear_forward(ly.qkv, xp, ldx, M, yp, ldy);
      linear_forward(ly.o, xp, ldx, M, yp, ldy);
      linear_forward(ly.gate_up, xp, ldx, M, yp, ldy);
      linear_forward(ly.down, xp, ldx, M, yp, ldy);
    }
    linear_forward(head_, xp, ldx, M, yp, ldy);
  }

 private:
  static void add_rows(float* h, const float* d, int64_t n) {
    for (int64_t i = 0; i < n; i += W) _mm256_storeu_ps(h + i, _mm256_add_ps(_mm256_loadu_ps(h + i), _mm256_loadu_ps(d + i)));
  }

  void silu_mul(const float* gu, int64_t ld, int64_t M, float* out) const {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; ++m) {
      const float* g = gu + m * ld;
      const float* u = g + I_;
      for (int64_t i = 0; i < I_; i += W) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp_ps(_mm256_xor_ps(gv, sign));  // exp(-g)
        const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + m * I_ + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
      }
    }
  }

  // K goes to [.., block, g, off / 8, d, off % 8] (8 keys side by side per d), V to [.., block, g, off, d].
  template <typename KV>
  void write_kv(int64_t l, const float* qkv, int64_t ld, const at::Tensor& req_rows, const at::Tensor& req_prefix,
                const at::Tensor& block_table, int64_t NB, KV* kp, KV* vp) const {
    const int64_t Q = req_prefix.numel(), NBmax = block_table.size(1);
    const int64_t* rr = req_rows.data_ptr<int64_t>();
    const int64_t* pre = req_prefix.data_ptr<int64_t>();
    const int64_t* bt = block_table.data_ptr<int64_t>();
    const int64_t blk_elems = Hkv_ * B_ * D_;
    for (int64_t q = 0; q < Q; ++q) {
      for (int64_t r = rr[q]; r < rr[q + 1]; ++r) {
        const int64_t slot = pre[q] + (r - rr[q]);
        TORCH_CHECK(slot / B_ < NBmax, "block table too short");
        const int64_t blk = bt[q * NBmax + slot / B_], off = slot % B_;
        TORCH_CHECK(blk >= 0 && blk < NB, "bad block id");
        const float* kr = qkv + r * ld + Hq_ * D_;
        const float* vr = kr + Hkv_ * D_;
        for (int64_t g = 0; g < Hkv_; ++g) {
          KV* kb = kp + (l * NB + blk) * blk_elems + g * B_ * D_ + (off / W) * D_ * W + off % W;
          for (int64_t d = 0; d < D_; ++d) store_kv(kb + d * W, kr[g * D_ + d]);
          store_kv_row(vp + (l * NB + blk) * blk_elems + (g * B_ + off) * D_, vr + g * D_, D_);
        }
      }
    }
  }

  // acc rows [NR, 64] += sum over keys j in [j0, j1), in j order, of p[row][j] * V[j] for a
  // head dim of 64 (p rows Spad apart, acc rows 64 apart). Each half of the head (32 floats)
  // keeps NR x 4 accumulators in registers, and each V load feeds all NR rows; every output
  // element is still its own FMA chain over j in order, so the rows' sums do not depend on
  // how many rows share the pass.
  template <int NR, typename KV>
  void values_rows64(const float* p, int64_t Spad, float* acc, const KV* vg, const int64_t* btq,
                     int64_t blk_elems, int64_t j0, int64_t j1, int64_t prefetch_end) const {
    for (int h = 0; h < 2; ++h) {
      __m256 a[NR][4];
      for (int r = 0; r < NR; ++r)
        for (int c = 0; c < 4; ++c) a[r][c] = _mm256_loadu_ps(acc + r * 64 + (h * 4 + c) * W);
      for (int64_t j = j0; j < j1;) {  // key by key, one pool block at a time
        const int64_t off = j & Bmask_, n = std::min(j1 - j, B_ - off);
        const KV* vr = vg + btq[j >> Bshift_] * blk_elems + off * 64 + h * 32;
        for (int64_t u = 0; u < n; ++u, vr += 64) {
          if (h == 0 && j + u + kPrefetchGroups * W < prefetch_end) {  // the value row 64 keys on
            const int64_t ja = j + u + kPrefetchGroups * W;
            const char* nv = reinterpret_cast<const char*>(vg + btq[ja >> Bshift_] * blk_elems + (ja & Bmask_) * 64);
            for (int64_t o = 0; o < static_cast<int64_t>(64 * sizeof(KV)); o += 64) _mm_prefetch(nv + o, _MM_HINT_T0);
          }
          __m256 e[NR];
          for (int r = 0; r < NR; ++r) e[r] = _mm256_set1_ps(p[r * Spad + j + u]);
          for (int c = 0; c < 4; ++c) {
            const __m256 v = load8(vr + c * W);
            for (int r = 0; r < NR; ++r) a[r][c] = _mm256_fmadd_ps(e[r], v, a[r][c]);
          }
        }
        j += n;
      }
      for (int r = 0; r < NR; ++r)
        for (int c = 0; c < 4; ++c) _mm256_storeu_ps(acc + r * 64 + (h * 4 + c) * W, a[r][c]);
    }
  }

  // scores of rows [row, row + G) (clamped to R) against every 8-key group of slots [0, S)
  // into sc: each score is the row's FMA chain over d = 0 .. D-1 (lane = key), then * scale.
  // The G query rows are first copied to qt [D][G], so one pointer walks them.
  template <int G, typename KV>
  void score_group(const float* qkv, int64_t ld, int64_t r0, int64_t g, int64_t n_rep, int64_t row, int64_t R,
                   const KV* kg, const int64_t* btq, int64_t blk_elems, int64_t S, float scale, float* sc,
                   int64_t Spad, const int64_t* last_vis, int64_t P) const {
    // slots past the last one any of the G rows sees are never read: not scored
    const int64_t t_hi = std::min(row + G - 1, R - 1) / n_rep;
    int64_t hi = 0;
    for (int64_t t = row / n_rep; t <= t_hi; ++t) hi = std::max(hi, P + last_vis[t] + 1);
    S = std::min(S, hi);
    alignas(32) float qt[512 * G];
    for (int i = 0; i < G; ++i) {
      const int64_t rw = std::min(row + i, R - 1);
      const float* qr = qkv + (r0 + rw / n_rep) * ld + (g * n_rep + rw % n_rep) * D_;
      for (int64_t d = 0; d < D_; ++d) qt[d * G + i] = qr[d];
    }
    // KG key groups at a time, so that at least 8 independent chains hide the FMA latency
    // when few rows are scored (one-token decoding: G = n_rep rows)
    constexpr int KG = G >= 8 ? 1 : (G >= 4 ? 2 : (G == 3 ? 3 : 4));
    const int64_t ng = (S + W - 1) / W;
    int64_t gi = 0;
    for (; gi + KG <= ng; gi += KG) {
      // fetch the key groups kPrefetchGroups ahead into cache while these are scored (K is read
      // from memory once per forward, in 8-key groups of D x 8 elements; pool blocks are apart)
      for (int64_t b = gi + kPrefetchGroups; b < std::min(ng, gi + kPrefetchGroups + KG); ++b) {
        const char* nk = reinterpret_cast<const char*>(kg + btq[(b * W) >> Bshift_] * blk_elems + (((b * W) & Bmask_) / W) * D_ * W);
        for (int64_t o = 0; o < static_cast<int64_t>(D_ * W * sizeof(KV)); o += 64) _mm_prefetch(nk + o, _MM_HINT_T0);
      }
      score_keys<G, KG>(qt, kg, btq, blk_elems, gi * W, scale, sc, Spad, row, R);
    }
    for (; gi < ng; ++gi) score_keys<G, 1>(qt, kg, btq, blk_elems, gi * W, scale, sc, Spad, row, R);
  }

  // scores of the G rows in qt [D][G] against key groups s0, s0 + 8, ... (KG of them).
  template <int G, int KG, typename KV>
  void score_keys(const float* qt, const KV* kg, const int64_t* btq, int64_t blk_elems, int64_t s0, float scale,
                  float* sc, int64_t Spad, int64_t row, int64_t R) const {
    const KV* kt[KG];
    for (int b = 0; b < KG; ++b) {
      const int64_t s = s0 + b * W;
      kt[b] = kg + btq[s >> Bshift_] * blk_elems + ((s & Bmask_) / W) * D_ * W;  // [D, 8]
    }
    __m256 a[KG][G];
    for (int b = 0; b < KG; ++b)
      for (int i = 0; i < G; ++i) a[b][i] = _mm256_setzero_ps();
    const float* qd = qt;
    for (int64_t d = 0; d < D_; ++d, qd += G) {
      for (int b = 0; b < KG; ++b) {
        const __m256 kv = load8(kt[b] + d * W);
        for (int i = 0; i < G; ++i) a[b][i] = _mm256_fmadd_ps(_mm256_set1_ps(qd[i]), kv, a[b][i]);
      }
    }
    const __m256 vs = _mm256_set1_ps(scale);
    for (int b = 0; b < KG; ++b)
      for (int i = 0; i < G && row + i < R; ++i)
        _mm256_storeu_ps(sc + (row + i) * Spad + s0 + b * W, _mm256_mul_ps(a[b][i], vs));
  }

  // Row r of request q (fed index t) attends to slots [0, P) and to P + a for a in
  // its visibility list, in that order ("compact" key index j). Its scores are
  // 8-key lane FMA chains over d (same arithmetic for every key), softmax lanes by
  // j then a fixed tree, weighted sum of V in j order: nothing depends on T, on
  // the other rows or on which keys other rows see.
  template <typename KV>
  void attention(int64_t l, const float* qkv, int64_t ld, float* out, const at::Tensor& req_rows,
                 const at::Tensor& req_prefix, const at::Tensor& block_table, const at::Tensor& vis_ptr,
                 const at::Tensor& vis_idx, int64_t NB, const KV* kpool, const KV* vpool) const {
    const int64_t Q = req_prefix.numel(), NBmax = block_table.size(1);
    const int64_t* rr = req_rows.data_ptr<int64_t>();
    const int64_t* pre = req_prefix.data_ptr<int64_t>();
    const int64_t* bt = block_table.data_ptr<int64_t>();
    const int64_t* vptr = vis_ptr.data_ptr<int64_t>();
    const int64_t* vidx = vis_idx.data_ptr<int64_t>();
    const int64_t n_rep = Hq_ / Hkv_, blk_elems = Hkv_ * B_ * D_;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D_));
    // One task per (request, kv head): a task writes only its rows' slice of out for its
    // heads, and every sum inside it runs in the same order whichever thread runs it.
    int64_t work = 0;
    for (int64_t q = 0; q < Q; ++q) work += (rr[q + 1] - rr[q]) * (pre[q] + rr[q + 1] - rr[q]);
    auto head = [&](int64_t q, int64_t g) {
      const int64_t r0 = rr[q], T = rr[q + 1] - r0, P = pre[q];
      if (T == 0) return;
      const int64_t S = P + T;                      // slots holding keys this call may read
      const int64_t Spad = (S + W - 1) / W * W;
      const int64_t R = T * n_rep;                  // query vectors per kv head
      const int64_t* btq = bt + q * NBmax;
      // scratch reused across calls (per thread: forwards release the GIL)
      thread_local std::vector<float> sc, acc;
      thread_local std::vector<int64_t> nvis;
      if (static_cast<int64_t>(sc.size()) < R * Spad) sc.resize(R * Spad);
      if (static_cast<int64_t>(acc.size()) < R * D_) acc.resize(R * D_);
      if (static_cast<int64_t>(nvis.size()) < T) nvis.resize(T);
      thread_local std::vector<int64_t> last_vis;  // per fed token: the last fed index it sees (-1: none)
      if (static_cast<int64_t>(last_vis.size()) < T) last_vis.resize(T);
      for (int64_t t = 0; t < T; ++t) {
        nvis[t] = vptr[r0 + t + 1] - vptr[r0 + t];
        last_vis[t] = nvis[t] ? vidx[vptr[r0 + t + 1] - 1] : -1;
      }
      const KV* kg = kpool + l * NB * blk_elems + g * B_ * D_;
      const KV* vg = vpool + l * NB * blk_elems + g * B_ * D_;
      // scores of every slot in [0, S), G rows at a time: G independent FMA chains hide the FMA
      // latency (each chain is one row's sequential sum over d, whatever group the row falls in)
      for (int64_t row = 0; row < R;) {
        const int64_t left = R - row;
        if (left >= 8) score_group<8, KV>(qkv, ld, r0, g, n_rep, row, R, kg, btq, blk_elems, S, scale, &sc[0], Spad, &last_vis[0], P);
        else if (left >= 4) score_group<4, KV>(qkv, ld, r0, g, n_rep, row, R, kg, btq, blk_elems, S, scale, &sc[0], Spad, &last_vis[0], P);
        else if (left == 3) score_group<3, KV>(qkv, ld, r0, g, n_rep, row, R, kg, btq, blk_elems, S, scale, &sc[0], Spad, &last_vis[0], P);
        else score_group<2, KV>(qkv, ld, r0, g, n_rep, row, R, kg, btq, blk_elems, S, scale, &sc[0], Spad, &last_vis[0], P);
        row += left >= 8 ? 8 : (left >= 4 ? 4 : (left == 3 ? 3 : 2));
      }
      // softmax per row over its compact key list, in place: slots [0, P) stay, the visible
      // fed slots are gathered right after them (vis is increasing, so reads stay ahead of writes)
      std::vector<float> denom(R);
      for (int64_t row = 0; row < R; ++row) {
        const int64_t t = row / n_rep, nv = nvis[t], n = P + nv;
        float* er = &sc[row * Spad];
        const int64_t* vis = vidx + vptr[r0 + t];
        for (int64_t j = 0; j < nv; ++j) er[P + j] = er[P + vis[j]];
        const int64_t nfull = n / W;
        __m256 vmax = _mm256_set1_ps(er[0]);
        for (int64_t b = 0; b < nfull; ++b) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(er + b * W));
        alignas(32) float mb[8];
        _mm256_store_ps(mb, vmax);
        float m = mb[0];
        for (int i = 1; i < 8; ++i) m = std::max(m, mb[i]);
        for (int64_t j = nfull * W; j < n; ++j) m = std::max(m, er[j]);  // max: exact in any order
        const __m256 vm = _mm256_set1_ps(m);
        __m256 lane = _mm256_setzero_ps();
        for (int64_t b = 0; b < nfull; ++b) {
          const __m256 y = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(er + b * W), vm));
          _mm256_storeu_ps(er + b * W, y);
          lane = _mm256_add_ps(lane, y);
        }
        if (nfull * W < n) {  // the last partial lane block: keys past the row's weigh exactly 0
          const int64_t valid = n - nfull * W;
          alignas(32) float buf[8];
          for (int i = 0; i < 8; ++i) buf[i] = i < valid ? er[nfull * W + i] : m;
          alignas(32) float yb[8];
          _mm256_store_ps(yb, exp_ps(_mm256_sub_ps(_mm256_load_ps(buf), vm)));
          for (int i = static_cast<int>(valid); i < 8; ++i) yb[i] = 0.0f;
          const __m256 y = _mm256_load_ps(yb);
          _mm256_storeu_ps(er + nfull * W, y);
          lane = _mm256_add_ps(lane, y);
        }
        denom[row] = tree_sum(lane);
      }
      // weighted sum of V in compact order: prefix slots (shared by all rows), then visible fed
      // slots. Keys in blocks of VB, rows inner, the row's accumulator in registers within a
      // block: V is read once per block for all rows, and each row still adds keys in j order.
      constexpr int64_t VB = 64;
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t nd = D_ / W;
      for (int64_t j0 = 0; j0 < P; j0 += VB) {
        const int64_t j1 = std::min(P, j0 + VB);
        if (nd == 8) {  // head dim 64: up to 3 rows at a time share each V load (values_rows64)
          for (int64_t row = 0; row < R;) {
            const int64_t nr = std::min<int64_t>(3, R - row);
            if (nr == 3) values_rows64<3>(&sc[row * Spad], Spad, &acc[row * D_], vg, btq, blk_elems, j0, j1, row ? 0 : P);
            else if (nr == 2) values_rows64<2>(&sc[row * Spad], Spad, &acc[row * D_], vg, btq, blk_elems, j0, j1, row ? 0 : P);
            else values_rows64<1>(&sc[row * Spad], Spad, &acc[row * D_], vg, btq, blk_elems, j0, j1, row ? 0 : P);
            row += nr;
          }
          continue;
        }
        for (int64_t row = 0; row < R; ++row) {
          const float* er = &sc[row * Spad];
          float* ar = &acc[row * D_];
          for (int64_t c0 = 0; c0 < nd; c0 += 8) {  // up to 8 registers (64 floats) of the row
            const int64_t nc = std::min<int64_t>(8, nd - c0);
            __m256 a[8];
            for (int64_t c = 0; c < nc; ++c) a[c] = _mm256_loadu_ps(ar + (c0 + c) * W);
            for (int64_t j = j0; j < j1; ++j) {
              const KV* vr = vg + btq[j >> Bshift_] * blk_elems + (j & Bmask_) * D_ + c0 * W;
              const __m256 ej = _mm256_set1_ps(er[j]);
              for (int64_t c = 0; c < nc; ++c) a[c] = _mm256_fmadd_ps(ej, load8(vr + c * W), a[c]);
            }
            for (int64_t c = 0; c < nc; ++c) _mm256_storeu_ps(ar + (c0 + c) * W, a[c]);
          }
        }
      }
      for (int64_t row = 0; row < R; ++row) {
        const int64_t t = row / n_rep, nv = nvis[t];
        const int64_t* vis = vidx + vptr[r0 + t];
        float* ar = &acc[row * D_];
        if (nd == 8) {  // head dim 64: accumulators in registers
          __m256 a[8];
          for (int c = 0; c < 8; ++c) a[c] = _mm256_loadu_ps(ar + c * W);
          for (int64_t j = 0; j < nv; ++j) {
            const int64_t slot = P + vis[j];
            const KV* vr = vg + btq[slot >> Bshift_] * blk_elems + (slot & Bmask_) * D_;
            const __m256 ej = _mm256_set1_ps(sc[row * Spad + P + j]);
            for (int c = 0; c < 8; ++c) a[c] = _mm256_fmadd_ps(ej, load8(vr + c * W), a[c]);
          }
          for (int c = 0; c < 8; ++c) _mm256_storeu_ps(ar + c * W, a[c]);
        } else {
          for (int64_t j = 0; j < nv; ++j) {
            const int64_t slot = P + vis[j];
            const KV* vr = vg + btq[slot >> Bshift_] * blk_elems + (slot & Bmask_) * D_;
            const __m256 ej = _mm256_set1_ps(sc[row * Spad + P + j]);
            for (int64_t c = 0; c < D_; c += W)
              _mm256_storeu_ps(ar + c, _mm256_fmadd_ps(ej, load8(vr + c), _mm256_loadu_ps(ar + c)));
          }
        }
        const __m256 dv = _mm256_set1_ps(denom[row]);
        float* orow = out + (r0 + t) * Hq_ * D_ + (g * n_rep + row % n_rep) * D_;
        for (int64_t c = 0; c < D_; c += W) _mm256_storeu_ps(orow + c, _mm256_div_ps(_mm256_loadu_ps(ar + c), dv));
      }
    };
    maybe_parallel(work * Hq_ * D_ >= g_parallel_min_work, Q * Hkv_, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) head(i / Hkv_, i % Hkv_);
    });
  }

  int64_t H_, Hq_, Hkv_, D_, I_;
  float eps_;
  int64_t B_;
  int64_t Bshift_ = 0, Bmask_ = 0;  // B_ is a power of two: slot / B_ and slot % B_ without a division
  at::Tensor cos_, sin_, embed_, norm_;
  std::vector<Layer> layers_;
  Linear head_;
};

at::Tensor linear_py(const Linear& L, at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == L.K && x.scalar_type() == at::kFloat, "x must be [M, K] float32");
  x = x.contiguous();
  at::Tensor y = at::empty({x.size(0), L.N}, x.options());
  linear_forward(L, x.data_ptr<float>(), L.K, x.size(0), y.data_ptr<float>(), L.N);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Linear>(m, "Linear")
      .def_readonly("N", &Linear::N)
      .def_readonly("K", &Linear::K)
      .def_readonly("int8", &Linear::int8)
      .def_readonly("wide", &Linear::wide)
      .def_property_readonly("isa", [](const Linear& L) { return std::string(L.vnni ? "avx512vnni" : "avx2"); });
  m.def("make_linear", &make_linear, py::arg("w"), py::arg("w_scale"), py::arg("bias"), py::arg("inv_smooth"),
        py::arg("activation_bits"));
  m.def("linear", &linear_py);
  m.def("gemm_isa", []() { return std::string(g_use_vnni ? "avx512vnni" : "avx2"); },
        "The int8 GEMM's instruction set for Linears made from now on: 'avx512vnni' or 'avx2'.");
  m.def("available_gemm_isas", []() {
        std::vector<std::string> out{"avx2"};
        if (g_has_vnni) out.push_back("avx512vnni");
        return out; });
  m.def("set_gemm_isa", [](const std::string& isa) {
        TORCH_CHECK(isa == "avx2" || (isa == "avx512vnni" && g_has_vnni),
                    "gemm isa must be 'avx2'", g_has_vnni ? " or 'avx512vnni'" : " (this CPU lacks AVX-512 VNNI)",
                    ", got '", isa, "'");
        g_use_vnni = isa == "avx512vnni"; });
  m.def("parallel_min_work", []() { return g_parallel_min_work; });
  m.def("set_parallel_min_work", [](int64_t v) {
        TORCH_CHECK(v >= 0, "parallel_min_work must be >= 0");
        g_parallel_min_work = v; });
  py::class_<LeanModel>(m, "LeanModel")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t, at::Tensor, at::Tensor, at::Tensor>())
      .def("add_layer", &LeanModel::add_layer)
      .def("set_head", &LeanModel::set_head)
      .def("num_layers", &LeanModel::num_layers)
      .def("weight_bytes", &LeanModel::weight_bytes)
      .def("matmuls_only", &LeanModel::matmuls_only, py::call_guard<py::gil_scoped_release>())
      .def("forward", &LeanModel::forward, py::call_guard<py::gil_scoped_release>());
}
