// Hand-written one-row int8 GEMVs with AVX2 instructions only, over SmolLM2-135M's 211 int8 matrices (the
// AVX2 counterpart of int8_gemv_avx512.cpp; docs/quant.md, "AVX2 code paths"). Built with -mavx2 -mfma, so it runs
// AVX2 code on any x86-64 CPU that has it, an AVX-512 one included.
//   f32cvt:  int8 weights converted to fp32 in registers (8 lanes), fp32 activations, 4 rows at a time (what a
//            float loop does)
//   maddubs: int8 activations x int8 weights as llama.cpp does on AVX2: the activation's sign moved onto the weight
//            (_mm256_sign_epi8), |x| x w summed in pairs to int16 (_mm256_maddubs_epi16: |x| <= 127 keeps the pair
//            sums inside int16), then to int32 (_mm256_madd_epi16), one fp32 scale per row at the end
// Random weights and activations; the activation quantization is not timed (one row per matrix: K values). This
// only times the weight streaming. Build and run (2 threads; L = layers, HEAD=1 adds the 49152 x 576 output head,
// NK=N,K,COUNT times COUNT distinct N x K matrices instead):
//   g++ -O3 -mavx2 -mfma -fopenmp tools/int8_gemv_avx2.cpp -o /tmp/gemv2 && HEAD=1 /tmp/gemv2
#include <immintrin.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <omp.h>

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
// y[n] = s[n] * sum_k x[k] * w[n,k]   (fp32 x, int8 w; K a multiple of 8)
static void gemv_f32(const float* x, const int8_t* w, const float* s, float* y, int N, int K) {
  #pragma omp for schedule(static) nowait
  for (int n = 0; n < N; n += 4) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < K; k += 8) {
      __m256 xv = _mm256_loadu_ps(x + k);
#define CVT(r) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + (size_t)(n + r) * K + k))))
      a0 = _mm256_fmadd_ps(xv, CVT(0), a0);
      a1 = _mm256_fmadd_ps(xv, CVT(1), a1);
      a2 = _mm256_fmadd_ps(xv, CVT(2), a2);
      a3 = _mm256_fmadd_ps(xv, CVT(3), a3);
#undef CVT
    }
    y[n] = s[n] * hsum8(a0); y[n + 1] = s[n + 1] * hsum8(a1);
    y[n + 2] = s[n + 2] * hsum8(a2); y[n + 3] = s[n + 3] * hsum8(a3);
  }
}
// xq: the activation row as int8 (|xq| <= 127) with one scale sx; K a multiple of 32
static inline __m256i dot32(__m256i ax, __m256i sx, __m256i wv, __m256i ones) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, sx)), ones);
}
static void gemv_maddubs(const int8_t* xq, float sx, const int8_t* w, const float* s, float* y, int N, int K) {
  const __m256i ones = _mm256_set1_epi16(1);
  #pragma omp for schedule(static) nowait
  for (int n = 0; n < N; n += 4) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < K; k += 32) {
      __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + k));
      __m256i ax = _mm256_sign_epi8(xv, xv);  // |x|
#define W(r) _mm256_loadu_si256((const __m256i*)(w + (size_t)(n + r) * K + k))
      a0 = _mm256_add_epi32(a0, dot32(ax, xv, W(0), ones));
      a1 = _mm256_add_epi32(a1, dot32(ax, xv, W(1), ones));
      a2 = _mm256_add_epi32(a2, dot32(ax, xv, W(2), ones));
      a3 = _mm256_add_epi32(a3, dot32(ax, xv, W(3), ones));
#undef W
    }
    y[n] = s[n] * sx * (float)hsum8i(a0); y[n + 1] = s[n + 1] * sx * (float)hsum8i(a1);
    y[n + 2] = s[n + 2] * sx * (float)hsum8i(a2); y[n + 3] = s[n + 3] * sx * (float)hsum8i(a3);
  }
}
int main() {
  std::vector<std::pair<int, int>> sh;
  int L = getenv("L") ? atoi(getenv("L")) : 30;
  for (int l = 0; l < L; l++) {
    int a[7][2] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};
    for (auto& p : a) sh.push_back({p[0], p[1]});
  }
  if (getenv("HEAD")) sh.push_back({49152, 576});
  if (getenv("NK")) {  // NK=N,K,COUNT: COUNT distinct N x K matrices instead (e.g. Phi-3.5's down projection)
    int n = 0, k = 0, c = 0;
    sscanf(getenv("NK"), "%d,%d,%d", &n, &k, &c);
    sh.assign(c, {n, k});
  }
  std::vector<int8_t*> W, XQ; std::vector<float*> S, X, Y; size_t bytes = 0;
  for (auto [n, k] : sh) {
    int8_t* w = (int8_t*)aligned_alloc(64, (size_t)n * k);
    for (size_t i = 0; i < (size_t)n * k; i++) w[i] = (int8_t)(rand() % 255 - 127);
    int8_t* xq = (int8_t*)aligned_alloc(64, (size_t)k);
    float* x = new float[k];
    for (int i = 0; i < k; i++) { xq[i] = (int8_t)(rand() % 255 - 127); x[i] = xq[i] / 127.f; }
    W.push_back(w); XQ.push_back(xq); X.push_back(x); bytes += (size_t)n * k;
    S.push_back(new float[n]()); Y.push_back(new float[n]);
  }
  // the two products agree (x = xq / 127, unit scales) before anything is timed
  for (size_t i = 0; i < sh.size(); i += 50) {
    int n = sh[i].first, k = sh[i].second; std::vector<float> ones(n, 1.f), y1(n), y2(n);
    #pragma omp parallel num_threads(2)
    { gemv_f32(X[i], W[i], ones.data(), y1.data(), n, k); }
    #pragma omp parallel num_threads(2)
    { gemv_maddubs(XQ[i], 1.f / 127, W[i], ones.data(), y2.data(), n, k); }
    for (int j = 0; j < n; j++) if (std::abs(y1[j] - y2[j]) > 1e-2f * (1 + std::abs(y1[j]))) { printf("mismatch\n"); return 1; }
  }
  for (int mode = 0; mode < 2; mode++) {
    double best = 1e9;
    for (int r = 0; r < 30; r++) {
      auto t0 = std::chrono::steady_clock::now();
      #pragma omp parallel num_threads(2)
      {
        for (size_t i = 0; i < sh.size(); i++) {
          if (mode == 0) gemv_f32(X[i], W[i], S[i], Y[i], sh[i].first, sh[i].second);
          else gemv_maddubs(XQ[i], 1.f, W[i], S[i], Y[i], sh[i].first, sh[i].second);
        }
      }
      double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (t < best) best = t;
    }
    printf("%s %.2f ms %.1f GB/s\n", mode ? "maddubs" : "f32cvt", best * 1e3, bytes / best / 1e9);
  }
}
