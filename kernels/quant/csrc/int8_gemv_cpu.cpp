// One-row int8 products for the CPU, built at first use by kernels/quant/native.py (g++, torch's headers) and
// loaded with torch.ops.load_library. Ops (namespace kernels_quant_cpu):
//
//   q8_gemv(x [1, K] float/bf16/fp16, w int8 [N, K], scales fp32 [N], isa int) -> [1, N] in x's dtype
//     llama.cpp's method: the activation row quantized to int8 in blocks of 32 (one fp32 scale per block,
//     max|x| / 127), integer dot products of each block with the weight codes, each block's sum scaled in fp32 and
//     accumulated; one scale per weight row at the end. isa 2: AVX2 (the activation's sign moved onto the weight with
//     _mm256_sign_epi8, |x| x w summed in pairs with _mm256_maddubs_epi16 and to int32 with _mm256_madd_epi16);
//     isa 5: AVX-512 VNNI (_mm512_dpbusd_epi32, two blocks per 64-byte load). A tail of K % 32 columns runs in fp32.
//   f32_gemv(x, w, scales, isa) -> [1, N]
//     the same product with the activations kept in fp32: each code converted to fp32 in registers (AVX2, 8 lanes).
//
// Both split the rows between torch's intra-op threads in contiguous ranges and read one weight row at a time, in
// order, with two accumulators: four rows interleaved (sharing each activation load) streamed half as fast (11.8 vs
// 22.5 GB/s over SmolLM2's 210 int8 matrices, AVX2, 2 threads). Nothing here is torch-version-specific beyond the
// op registration; docs/quant.md ("Native int8 kernels") has the measurements.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;

bool cpu_has_avx512_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows [r0, r1) of y = s * (W x), x quantized per block: xq (K codes), xd (K / 32 block scales), xf (the fp32 row,
// for the tail). One row at a time (its weights read in order, as the hardware prefetchers like), two accumulators.
__attribute__((target("avx2,fma"))) void q8_rows_avx2(const int8_t* xq, const float* xd, const float* xf,
                                                     const int8_t* w, const float* s, float* y, int64_t r0, int64_t r1,
                                                     int64_t K) {
  const int64_t nb = K / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = r0; n < r1; n++) {
    const int8_t* wr = w + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t b = 0;
#define FMCHAT_Q8_BLOCK(acc, blk)                                                                                   \
  {                                                                                                                 \
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (blk) * kBlock));                  \
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + (blk) * kBlock));                  \
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv)), ones); \
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xd[blk]), acc);                                     \
  }
    for (; b + 2 <= nb; b += 2) {
      FMCHAT_Q8_BLOCK(a0, b)
      FMCHAT_Q8_BLOCK(a1, b + 1)
    }
    for (; b < nb; b++) FMCHAT_Q8_BLOCK(a0, b)
#undef FMCHAT_Q8_BLOCK
    float t = hsum8(_mm256_add_ps(a0, a1));
    for (int64_t k = nb * kBlock; k < K; k++) t += xf[k] * static_cast<float>(wr[k]);
    y[n] = s[n] * t;
  }
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma"))) inline float hsum16(__m512 v) {
  return _mm512_reduce_add_ps(v);
}

// The same with AVX-512 VNNI: 64 codes (two blocks) per load; |x| (u8) x sign-moved w (s8) summed in fours into int32
// by vpdpbusd; lanes 0-7 belong to the first block, 8-15 to the second. An odd last block goes through AVX2.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma"))) void q8_rows_vnni(
    const int8_t* xq, const float* xd, const float* xf, const int8_t* w, const float* s, float* y, int64_t r0,
    int64_t r1, int64_t K) {
  const int64_t nb = K / kBlock, npairs = nb / 2;
  const __m512i zero = _mm512_setzero_si512();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = r0; n < r1; n++) {
    const int8_t* wr = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
#define FMCHAT_VNNI_PAIR(acc, p)                                                                                    \
  {                                                                                                                 \
    const __m512i xv = _mm512_loadu_si512(xq + (p) * 2 * kBlock);                                                   \
    const __m512i wv = _mm512_loadu_si512(wr + (p) * 2 * kBlock);                                                   \
    const __m512i sw = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(xv), zero, wv);                                 \
    const __m512i q = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(xv), sw);                                           \
    const __m512 d = _mm512_insertf32x8(_mm512_set1_ps(xd[2 * (p)]), _mm256_set1_ps(xd[2 * (p) + 1]), 1);           \
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), d, acc);                                                           \
  }
    int64_t p = 0;
    for (; p + 2 <= npairs; p += 2) {
      FMCHAT_VNNI_PAIR(a0, p)
      FMCHAT_VNNI_PAIR(a1, p + 1)
    }
    for (; p < npairs; p++) FMCHAT_VNNI_PAIR(a0, p)
#undef FMCHAT_VNNI_PAIR
    float t = hsum16(_mm512_add_ps(a0, a1));
    for (int64_t b = npairs * 2; b < nb; b++) {  // an odd block
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * kBlock));
      const __m256i q = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv)), ones);
      t += xd[b] * hsum8(_mm256_cvtepi32_ps(q));
    }
    for (int64_t k = nb * kBlock; k < K; k++) t += xf[k] * static_cast<float>(wr[k]);
    y[n] = s[n] * t;
  }
}

// fp32 activations: the codes converted to fp32 in registers, 8 at a time; one row at a time, two accumulators.
__attribute__((target("avx2,fma"))) void f32_rows_avx2(const float* x, const int8_t* w, const float* s, float* y,
                                                      int64_t r0, int64_t r1, int64_t K) {
  const int64_t k16 = K / 16 * 16, k8 = K / 8 * 8;
  for (int64_t n = r0; n < r1; n++) {
    const int8_t* wr = w + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
#define FMCHAT_CVT(k) \
  _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + (k)))))
    int64_t k = 0;
    for (; k < k16; k += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), FMCHAT_CVT(k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), FMCHAT_CVT(k + 8), a1);
    }
    for (; k < k8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), FMCHAT_CVT(k), a0);
#undef FMCHAT_CVT
    float t = hsum8(_mm256_add_ps(a0, a1));
    for (; k < K; k++) t += x[k] * static_cast<float>(wr[k]);
    y[n] = s[n] * t;
  }
}

void check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && s.device().is_cpu(), "int8 gemv: CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "int8 gemv: w must be contiguous int8 [N, K]");
  TORCH_CHECK(x.numel() == w.size(1) && x.size(-1) == w.size(1), "int8 gemv: x must be one row of K = ", w.size(1));
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == w.size(0) && s.is_contiguous(), "int8 gemv: scales must be fp32 [N]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "int8 gemv: x must be float32, bfloat16 or float16");
}

// The activation row as fp32.
std::vector<float> row_f32(const at::Tensor& x) {
  const int64_t K = x.numel();
  std::vector<float> xf(K);
  const at::Tensor xc = x.contiguous();
  if (xc.scalar_type() == at::kFloat) {
    std::copy(xc.const_data_ptr<float>(), xc.const_data_ptr<float>() + K, xf.begin());
  } else if (xc.scalar_type() == at::kBFloat16) {
    const c10::BFloat16* p = xc.const_data_ptr<c10::BFloat16>();
    for (int64_t k = 0; k < K; k++) xf[k] = static_cast<float>(p[k]);
  } else {
    const c10::Half* p = xc.const_data_ptr<c10::Half>();
    for (int64_t k = 0; k < K; k++) xf[k] = static_cast<float>(p[k]);
  }
  return xf;
}

at::Tensor finish(const std::vector<float>& y, const at::Tensor& x) {
  const int64_t N = static_cast<int64_t>(y.size());
  at::Tensor out = at::empty({1, N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    std::copy(y.begin(), y.end(), out.mutable_data_ptr<float>());
  } else if (x.scalar_type() == at::kBFloat16) {
    c10::BFloat16* p = out.mutable_data_ptr<c10::BFloat16>();
    for (int64_t n = 0; n < N; n++) p[n] = c10::BFloat16(y[n]);
  } else {
    c10::Half* p = out.mutable_data_ptr<c10::Half>();
    for (int64_t n = 0; n < N; n++) p[n] = c10::Half(y[n]);
  }
  return out;
}

// Rows split between the threads in contiguous ranges; small matrices stay on one thread (the hand-off costs more).
template <typename F>
void for_rows(int64_t N, int64_t K, const F& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) { f(r0, r1); });
}

at::Tensor q8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t isa) {
  check(x, w, s);
  const int64_t N = w.size(0), K = w.size(1), nb = K / kBlock;
  std::vector<float> xf = row_f32(x);
  std::vector<int8_t> xq(nb * kBlock);
  std::vector<float> xd(nb);
  for (int64_t b = 0; b < nb; b++) {
    float amax = 0.f;
    for (int64_t i = 0; i < kBlock; i++) amax = std::max(amax, std::fabs(xf[b * kBlock + i]));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    xd[b] = d;
    for (int64_t i = 0; i < kBlock; i++) xq[b * kBlock + i] = static_cast<int8_t>(std::nearbyint(xf[b * kBlock + i] * inv));
  }
  std::vector<float> y(N);
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const float* sp = s.const_data_ptr<float>();
  const bool vnni = isa >= 5 && cpu_has_avx512_vnni();
  for_rows(N, K, [&](int64_t r0, int64_t r1) {
    if (vnni) {
      q8_rows_vnni(xq.data(), xd.data(), xf.data(), wp, sp, y.data(), r0, r1, K);
    } else {
      q8_rows_avx2(xq.data(), xd.data(), xf.data(), wp, sp, y.data(), r0, r1, K);
    }
  });
  return finish(y, x);
}

at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t isa) {
  check(x, w, s);
  (void)isa;
  const int64_t N = w.size(0), K = w.size(1);
  std::vector<float> xf = row_f32(x);
  std::vector<float> y(N);
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const float* sp = s.const_data_ptr<float>();
  for_rows(N, K, [&](int64_t r0, int64_t r1) { f32_rows_avx2(xf.data(), wp, sp, y.data(), r0, r1, K); });
  return finish(y, x);
}

}  // namespace

TORCH_LIBRARY(kernels_quant_cpu, m) {
  m.def("q8_gemv(Tensor x, Tensor w, Tensor scales, int isa) -> Tensor");
  m.def("f32_gemv(Tensor x, Tensor w, Tensor scales, int isa) -> Tensor");
  m.def("isa_available(int isa) -> bool", [](int64_t isa) -> bool {
    return isa <= 2 ? (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) : cpu_has_avx512_vnni();
  });
}

TORCH_LIBRARY_IMPL(kernels_quant_cpu, CPU, m) {
  m.impl("q8_gemv", &q8_gemv);
  m.impl("f32_gemv", &f32_gemv);
}
