// Batch-invariant causal attention for one sequence (see adaspec/quant/attention.py).
// Every output row is computed by the same fixed sequence of float operations,
// whatever the number of queries T in the call: dot products in 8 fixed lanes
// over the head dimension then a fixed tree; softmax sum in 8 lanes by key
// index then a fixed tree; weighted sum over keys in key order. No scalar tails.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <vector>

namespace {
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int64_t W = 8;  // lanes
constexpr int64_t PARALLEL_MIN_WORK = 1 << 20;  // multiply-adds per phase below which one thread runs

template <typename F>
void run(bool parallel, int64_t n, const F& f) {
  if (parallel) at::parallel_for(0, n, 1, f); else f(0, n);
}

inline v8f load(const float* p) { v8f v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline float tree_sum(v8f p) {  // fixed order: ((p0+p4)+(p2+p6)) + ((p1+p5)+(p3+p7))
  const float a0 = p[0] + p[4], a1 = p[1] + p[5], a2 = p[2] + p[6], a3 = p[3] + p[7];
  return (a0 + a2) + (a1 + a3);
}
// exp(x) for x <= 0 (Cephes expf polynomial), lane by lane.
inline v8f exp_nonpos(v8f x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(0.0f) ? splat(0.0f) : x;
  const v8f n = (x * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f);
  v8f r = x - n * splat(0.693359375f);
  r = r + n * splat(2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  return p * (v8f)bits;
}

template <int64_t ND>  // ND = D / W, 0 = runtime
void attend(const float* qp, const float* kp, const float* vp, float* sp, float* op, int64_t T, int64_t H,
            int64_t D, int64_t Hkv, int64_t S, float scale) {
  const int64_t nd = ND ? ND : D / W;
  const int64_t n_rep = H / Hkv, R = T * n_rep;
  const int64_t nblk = (S + W - 1) / W, Spad = nblk * W;
  constexpr int64_t KB = 32;  // keys per scoring task
  const int64_t nkb = (S + KB - 1) / KB;
  // Small calls run on the calling thread: a parallel region's barrier costs more
  // than the work (and stalls badly when another process holds the other core).
  const bool par = Hkv * R * S * D >= PARALLEL_MIN_WORK;
  run(par, Hkv * nkb, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / nkb, l0 = (task % nkb) * KB, l1 = std::min(l0 + KB, S);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t lend = std::min(l1, S - T + t + 1);  // keys visible to query t
        for (int64_t r = 0; r < n_rep; ++r) {
          const float* qr = qp + (t * H + g * n_rep + r) * D;
          float* srow = sp + (g * R + t * n_rep + r) * Spad;
          for (int64_t l = l0; l < lend; ++l) {
            const float* kr = kp + (g * S + l) * D;
            v8f part = load(qr) * load(kr);
            for (int64_t c = 1; c < nd; ++c) part = part + load(qr + c * W) * load(kr + c * W);
            srow[l] = tree_sum(part) * scale;
          }
        }
      }
    }
  });
  run(par, Hkv * R, [&](int64_t begin, int64_t end) {
    std::vector<float> ebuf(Spad);
    float* e = ebuf.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / R, row = task % R;
      const int64_t t = row / n_rep, r = row % n_rep;
      const int64_t n_keys = S - T + t + 1;
      const int64_t nb = (n_keys + W - 1) / W;
      const float* srow = sp + (g * R + row) * Spad;
      float m = srow[0];
      for (int64_t l = 1; l < n_keys; ++l) m = srow[l] > m ? srow[l] : m;
      v8f lane = splat(0.0f);
      const v8i idx = {0, 1, 2, 3, 4, 5, 6, 7};
      for (int64_t b = 0; b < nb; ++b) {
        v8f y = exp_nonpos(load(srow + b * W) - splat(m));
        const v8i valid = idx < (v8i){0, 0, 0, 0, 0, 0, 0, 0} + (int32_t)(n_keys - b * W);
        y = valid ? y : splat(0.0f);  // keys past this query (or padding) weigh exactly 0
        store(e + b * W, y);
        lane = lane + y;
      }
      const float denom = tree_sum(lane);
      v8f acc[ND ? ND : 32];
      for (int64_t c = 0; c < nd; ++c) acc[c] = splat(0.0f);
      const float* vg = vp + g * S * D;
      for (int64_t l = 0; l < n_keys; ++l) {
        const v8f el = splat(e[l]);
        const float* vr = vg + l * D;
        for (int64_t c = 0; c < nd; ++c) acc[c] = acc[c] + el * load(vr + c * W);
      }
      float* orow = op + (t * H + g * n_rep + r) * D;
      const v8f dv = splat(denom);
      for (int64_t c = 0; c < nd; ++c) store(orow + c * W, acc[c] / dv);
    }
  });
}
}  // namespace

// q: [T, H, D], k, v: [Hkv, S, D] float32; query t sits at position S - T + t.
// Returns [T, H, D].
torch::Tensor invariant_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scaling) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32,
              "float32 only");
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(0), S = k.size(1);
  TORCH_CHECK(H % Hkv == 0 && k.size(2) == D && v.size(1) == S && v.size(2) == D && T <= S && T >= 1,
              "bad shapes");
  TORCH_CHECK(D % W == 0 && D <= 32 * W, "head dim must be a multiple of 8 and at most 256");
  const int64_t Spad = (S + W - 1) / W * W;
  auto out = torch::empty({T, H, D}, q.options());
  auto scores = torch::empty({Hkv, T * (H / Hkv), Spad}, q.options());
  const float s = static_cast<float>(scaling);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *sp = scores.data_ptr<float>(), *op = out.data_ptr<float>();
  switch (D / W) {
    case 4: attend<4>(qp, kp, vp, sp, op, T, H, D, Hkv, S, s); break;
    case 8: attend<8>(qp, kp, vp, sp, op, T, H, D, Hkv, S, s); break;
    case 16: attend<16>(qp, kp, vp, sp, op, T, H, D, Hkv, S, s); break;
    default: attend<0>(qp, kp, vp, sp, op, T, H, D, Hkv, S, s);
  }
  return out;
}
