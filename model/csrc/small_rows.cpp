// CPU fp32 kernels for steps with few rows per weight (decode): each weight row is read from
// memory once and dotted with every input row while it is in L1, at close to the machine's
// read bandwidth and with one parallel region per call. See model/cpu_kernels.py.
//
// Shape legend: N = input rows, IN / OUT = input / output features, E = experts held,
// H = hidden, I = expert intermediate size.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGrain = 32;  // output features per parallel task

// sum_i a[i] * b[i] in fp32, in SIMD lanes (the order of the sum is the compiler's).
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void check_fp32(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.dim() == dim,
              name, " must be a contiguous float32 CPU tensor with ", dim, " dimensions");
}

}  // namespace

// x [N, IN], ws = [w_0 [OUT_0, IN], w_1 [OUT_1, IN], ...] -> [N, OUT_0 + OUT_1 + ...]: x w_j^T side by
// side, so that projections of one input (q, k and v) share a call and a parallel region.
torch::Tensor rows_linear(const torch::Tensor& x, const std::vector<torch::Tensor>& ws) {
  check_fp32(x, "x", 2);
  TORCH_CHECK(!ws.empty(), "rows_linear needs at least one weight");
  const int64_t n = x.size(0), in = x.size(1);
  std::vector<const float*> wp;  // weight row o of the concatenation is wp[j] + (o - first[j]) * in
  std::vector<int64_t> first{0};
  for (const auto& w : ws) {
    check_fp32(w, "each weight", 2);
    TORCH_CHECK(w.size(1) == in, "x has ", in, " features but a weight takes ", w.size(1));
    wp.push_back(w.data_ptr<float>());
    first.push_back(first.back() + w.size(0));
  }
  const int64_t out = first.back();
  auto y = torch::empty({n, out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, kGrain, [&](int64_t lo, int64_t hi) {
    size_t j = 0;
    for (int64_t o = lo; o < hi; ++o) {
      while (o >= first[j + 1]) ++j;
      const float* wo = wp[j] + (o - first[j]) * in;  // one weight row, reused for every input row
      for (int64_t r = 0; r < n; ++r) yp[r * out + o] = dot(wo, xp + r * in, in);
    }
  });
  return y;
}

// SwiGLU experts on few rows: x [N, H], expert [N] (local index of each row's expert),
// w1, w3 [E, I, H], w2 [E, H, I] -> [N, H] with y_r = w2[e] (silu(w1[e] x_r) * (w3[e] x_r)).
// Two parallel regions whatever the number of experts hit: the gate/up products of every
// expert in use, then the down products.
torch::Tensor expert_ffn(const torch::Tensor& x, const torch::Tensor& expert, const torch::Tensor& w1,
                         const torch::Tensor& w3, const torch::Tensor& w2) {
  check_fp32(x, "x", 2);
  check_fp32(w1, "w1", 3);
  check_fp32(w3, "w3", 3);
  check_fp32(w2, "w2", 3);
  TORCH_CHECK(expert.device().is_cpu() && expert.scalar_type() == torch::kInt64 && expert.dim() == 1 &&
                  expert.size(0) == x.size(0),
              "expert must be an int64 CPU tensor with one entry per row of x");
  const int64_t n = x.size(0), h = x.size(1), e = w1.size(0), inter = w1.size(1);
  TORCH_CHECK(w1.sizes() == w3.sizes() && w1.size(2) == h, "w1 and w3 must both be [E, I, H] with H = ", h);
  TORCH_CHECK(w2.size(0) == e && w2.size(1) == h && w2.size(2) == inter, "w2 must be [E, H, I]");

  // The experts in use and their rows, in order of first appearance.
  const auto ex = expert.contiguous();
  const int64_t* ep = ex.data_ptr<int64_t>();
  std::vector<int64_t> slot_of(e, -1);
  std::vector<int64_t> used;                     // expert of each slot
  std::vector<std::vector<int64_t>> rows;        // rows of each slot
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(ep[r] >= 0 && ep[r] < e, "row ", r, " is routed to expert ", ep[r], " of ", e);
    if (slot_of[ep[r]] < 0) {
      slot_of[ep[r]] = static_cast<int64_t>(used.size());
      used.push_back(ep[r]);
      rows.emplace_back();
    }
    rows[slot_of[ep[r]]].push_back(r);
  }
  const int64_t slots = static_cast<int64_t>(used.size());

  auto act = torch::empty({n, inter}, x.options());  // [N, I] silu(gate) * up of each row
  auto y = torch::empty({n, h}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* w1p = w1.data_ptr<float>();
  const float* w3p = w3.data_ptr<float>();
  const float* w2p = w2.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  float* yp = y.data_ptr<float>();

  at::parallel_for(0, slots * inter, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t s = k / inter, i = k % inter;
      const float* g = w1p + (used[s] * inter + i) * h;
      const float* u = w3p + (used[s] * inter + i) * h;
      for (int64_t r : rows[s]) {
        const float a = dot(g, xp + r * h, h);
        ap[r * inter + i] = a / (1.f + std::exp(-a)) * dot(u, xp + r * h, h);
      }
    }
  });
  at::parallel_for(0, slots * h, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t s = k / h, o = k % h;
      const float* d = w2p + (used[s] * h + o) * inter;
      for (int64_t r : rows[s]) yp[r * h + o] = dot(d, ap + r * inter, inter);
    }
  });
  return y;
}

// One query per sequence against its keys in the paged pool (decode): q [S, Hq, D], k_pool and
// v_pool [P, Hkv, D], k_index [S, Tk] (pool rows of each sequence's keys, padded), key_lens [S]
// (keys of each sequence: its first key_lens[s] entries of k_index, all visible to its query)
// -> [S, Hq, D] = softmax(scale q k^T) v per head, query head h reading kv head h / (Hq / Hkv).
// Replaces the gather of keys and values, SDPA and the scatter back: one parallel region.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                               const torch::Tensor& k_index, const torch::Tensor& key_lens, double scale) {
  check_fp32(q, "q", 3);
  check_fp32(k_pool, "k_pool", 3);
  check_fp32(v_pool, "v_pool", 3);
  const int64_t s = q.size(0), hq = q.size(1), d = q.size(2), pool = k_pool.size(0), hkv = k_pool.size(1);
  TORCH_CHECK(k_pool.sizes() == v_pool.sizes() && k_pool.size(2) == d && hkv > 0 && hq % hkv == 0,
              "k_pool and v_pool must be [P, Hkv, D] with Hkv dividing the ", hq, " query heads");
  for (const auto* t : {&k_index, &key_lens})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                "k_index and key_lens must be contiguous int64 CPU tensors");
  TORCH_CHECK(k_index.dim() == 2 && k_index.size(0) == s && key_lens.dim() == 1 && key_lens.size(0) == s,
              "k_index must be [S, Tk] and key_lens [S] for S = ", s, " queries");
  const int64_t tk = k_index.size(1), group = hq / hkv;
  const int64_t* idx = k_index.data_ptr<int64_t>();
  const int64_t* lens = key_lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < s; ++i) {
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= tk, "query ", i, " has ", lens[i], " keys of ", tk);
    for (int64_t j = 0; j < lens[i]; ++j)
      TORCH_CHECK(idx[i * tk + j] >= 0 && idx[i * tk + j] < pool, "key slot ", idx[i * tk + j], " is outside the pool");
  }
  auto out = torch::empty({s, hq, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, s * hq, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> p(tk);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t i = task / hq, h = task % hq, kvh = h / group, n = lens[i];
      const float* qv = qp + task * d;
      float top = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = static_cast<float>(scale) * dot(qv, kp + (idx[i * tk + j] * hkv + kvh) * d, d);
        top = std::max(top, p[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) total += (p[j] = std::exp(p[j] - top));
      float* ov = op + task * d;
      for (int64_t c = 0; c < d; ++c) ov[c] = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const float w = p[j] / total;
        const float* vv = vp + (idx[i * tk + j] * hkv + kvh) * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) ov[c] += w * vv[c];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rows_linear", &rows_linear, "x [N, IN] times each w_j [OUT_j, IN]^T, side by side, for few rows");
  m.def("expert_ffn", &expert_ffn, "SwiGLU experts on few rows, each row through its own expert");
  m.def("decode_attention", &decode_attention, "one query per sequence against its keys in the paged pool");
}
