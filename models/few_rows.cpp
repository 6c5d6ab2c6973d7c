// out = x @ wᵀ for a few rows of x (1-16), fp32, on a CPU: the product decoding spends its time in.
//
// Each weight row is read from memory once and multiplied by every row of x while it is in registers, so the cost
// of 1 to 8 rows is the cost of streaming the weights (measured on this project's 2-core AVX-512 CPU, SmolLM2-135M's
// 210 layer matrices and LM head: 19.6 / 19.6 / 19.5 / 19.8 / 21.9 ms for 1 / 2 / 4 / 5 / 8 rows, against MKL's
// 20-45 ms, see models/kernels.py; 16 rows 42.5 against MKL's 84.5). What makes it flat is the software prefetch
// into L2 a few kilobytes ahead: without it the loop stalls on memory once each weight row carries 4 or more rows
// of arithmetic (31 ms at 4 rows).
//
// Each output element is one sum in a fixed order over k (vector lanes, then the lanes added in a fixed order):
// a row's result does not depend on how many other rows share the call, so a target's logits for a token are the
// same bits in a 1-token step and in a 5-token verification.
//
// Built on first use by models/kernels.py (torch.utils.cpp_extension), once per instruction set; the weights'
// inner dimension must be a multiple of the vector width (kernels.py falls back to MKL otherwise).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#if defined(__AVX512F__)
constexpr int kLanes = 16;
typedef __m512 Vec;
static inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
static inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline Vec zero() { return _mm512_setzero_ps(); }
static inline float total(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
typedef __m256 Vec;
static inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
static inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline Vec zero() { return _mm256_setzero_ps(); }
static inline float total(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
#else
#error "few_rows.cpp needs AVX2 with FMA, or AVX-512"
#endif

constexpr int64_t kPrefetch = 2048;  // floats ahead (8 KB) on each weight stream; 2048-8192 measured alike

// out[r, n .. n+B) for all R rows of x
template <int R, int B>
static inline void tile(const float* __restrict x, const float* __restrict w, float* __restrict out, int64_t K,
                        int64_t N, int64_t n) {
  Vec acc[B][R];
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = zero();
  for (int64_t k = 0; k < K; k += kLanes) {
    Vec weights[B];
    for (int b = 0; b < B; ++b) {
      weights[b] = load(w + (n + b) * K + k);
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + b) * K + k + kPrefetch), _MM_HINT_T1);
    }
    for (int r = 0; r < R; ++r) {
      Vec row = load(x + r * K + k);
      for (int b = 0; b < B; ++b) acc[b][r] = fma(weights[b], row, acc[b][r]);
    }
  }
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < R; ++r) out[r * N + n + b] = total(acc[b][r]);
}

// Rows 9-16 go through a second tile over the same two weight rows, which the first tile has just brought into L1:
// the weights are still streamed from memory once (16 rows in one tile would need more registers than there are).
template <int R, int B>
static inline void tiles(const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t n) {
  tile<(R < 8 ? R : 8), B>(x, w, out, K, N, n);
  if constexpr (R > 8) tile<R - 8, B>(x + 8 * K, w, out + 8 * N, K, N, n);
}

template <int R>
static void product(const float* x, const float* w, float* out, int64_t K, int64_t N) {
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + 2 <= end; n += 2) tiles<R, 2>(x, w, out, K, N, n);  // 2·8 accumulators, 2 weights, 1 row: registers
    for (; n < end; ++n) tiles<R, 1>(x, w, out, K, N, n);
  });
}

using Product = void (*)(const float*, const float*, float*, int64_t, int64_t);
template <int... R>
static constexpr Product kProducts[] = {product<R>...};

torch::Tensor few_rows(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "few_rows: x [rows, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "few_rows: fp32 only");
  TORCH_CHECK(!x.is_cuda() && !w.is_cuda(), "few_rows: CPU tensors only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 16, "few_rows: 1-16 rows, got ", x.size(0));
  TORCH_CHECK(w.size(1) % kLanes == 0, "few_rows: the inner dimension must be a multiple of ", kLanes);
  x = x.contiguous();
  w = w.contiguous();
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  kProducts<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>[x.size(0) - 1](
      x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), w.size(1), w.size(0));
  return out;
}

int64_t lanes() { return kLanes; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("few_rows", &few_rows, "x @ w.T for 1-16 rows of x (fp32, CPU)");
  m.def("lanes", &lanes, "the vector width in floats the inner dimension must be a multiple of");
}
