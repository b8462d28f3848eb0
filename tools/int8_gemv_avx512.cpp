// Hand-written one-row int8 GEMVs over SmolLM2-135M's 211 int8 matrices, for comparison with inductor's
// (docs/decode.md; tools/int8_gemv_rate.py times inductor's on the same shapes).
//   f32cvt: int8 weights converted to fp32 in registers, fp32 activations, 4 rows at a time (what inductor emits)
//   vnni:   u8 activations x s8 weights with AVX512-VNNI (vpdpbusd), llama.cpp's approach (activations quantized)
// Weights and activations are random and the activation quantization is not done here: this only times the
// weight streaming. Build and run (2 threads; L = layers, HEAD=1 adds the 49152 x 576 output head):
//   g++ -O3 -march=native -fopenmp tools/int8_gemv_avx512.cpp -o /tmp/gemv && HEAD=1 /tmp/gemv
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <chrono>
#include <omp.h>
// y[n] = s[n] * sum_k x[k] * w[n,k]   (fp32 x, int8 w)
static void gemv_f32(const float* x, const int8_t* w, const float* s, float* y, int N, int K) {
  #pragma omp for schedule(static) nowait
  for (int n = 0; n < N; n += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < K; k += 16) {
      __m512 xv = _mm512_loadu_ps(x + k);
      a0 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + (size_t)(n+0)*K + k)))), a0);
      a1 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + (size_t)(n+1)*K + k)))), a1);
      a2 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + (size_t)(n+2)*K + k)))), a2);
      a3 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + (size_t)(n+3)*K + k)))), a3);
    }
    y[n] = s[n]*_mm512_reduce_add_ps(a0); y[n+1] = s[n+1]*_mm512_reduce_add_ps(a1);
    y[n+2] = s[n+2]*_mm512_reduce_add_ps(a2); y[n+3] = s[n+3]*_mm512_reduce_add_ps(a3);
  }
}
// VNNI: xq u8 (x/sx + 128 per block of 32... here per-tensor for the ceiling), wsum[n] = 128*sum_k w
static void gemv_vnni(const uint8_t* xq, float sx, const int8_t* w, const int32_t* wsum, const float* s, float* y, int N, int K) {
  #pragma omp for schedule(static) nowait
  for (int n = 0; n < N; n += 4) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int k = 0;
    for (; k + 64 <= K; k += 64) {
      __m512i xv = _mm512_loadu_si512(xq + k);
      a0 = _mm512_dpbusd_epi32(a0, xv, _mm512_loadu_si512(w + (size_t)(n+0)*K + k));
      a1 = _mm512_dpbusd_epi32(a1, xv, _mm512_loadu_si512(w + (size_t)(n+1)*K + k));
      a2 = _mm512_dpbusd_epi32(a2, xv, _mm512_loadu_si512(w + (size_t)(n+2)*K + k));
      a3 = _mm512_dpbusd_epi32(a3, xv, _mm512_loadu_si512(w + (size_t)(n+3)*K + k));
    }
    if (k < K) { __mmask64 m = (K - k) >= 64 ? ~0ULL : ((1ULL << (K - k)) - 1);
      __m512i xv = _mm512_maskz_loadu_epi8(m, xq + k);
      a0 = _mm512_dpbusd_epi32(a0, xv, _mm512_maskz_loadu_epi8(m, w + (size_t)(n+0)*K + k));
      a1 = _mm512_dpbusd_epi32(a1, xv, _mm512_maskz_loadu_epi8(m, w + (size_t)(n+1)*K + k));
      a2 = _mm512_dpbusd_epi32(a2, xv, _mm512_maskz_loadu_epi8(m, w + (size_t)(n+2)*K + k));
      a3 = _mm512_dpbusd_epi32(a3, xv, _mm512_maskz_loadu_epi8(m, w + (size_t)(n+3)*K + k)); }
    y[n] = s[n]*sx*(float)(_mm512_reduce_add_epi32(a0) - wsum[n]);
    y[n+1] = s[n+1]*sx*(float)(_mm512_reduce_add_epi32(a1) - wsum[n+1]);
    y[n+2] = s[n+2]*sx*(float)(_mm512_reduce_add_epi32(a2) - wsum[n+2]);
    y[n+3] = s[n+3]*sx*(float)(_mm512_reduce_add_epi32(a3) - wsum[n+3]);
  }
}
int main() {
  std::vector<std::pair<int,int>> sh;
  int L = getenv("L") ? atoi(getenv("L")) : 30; for (int l = 0; l < L; l++) { int a[7][2] = {{576,576},{192,576},{192,576},{576,576},{1536,576},{1536,576},{576,1536}}; for (auto& p : a) sh.push_back({p[0],p[1]}); }
  if (getenv("HEAD")) sh.push_back({49152, 576});
  std::vector<int8_t*> W; std::vector<float*> S, X, Y; std::vector<uint8_t*> XQ; std::vector<int32_t*> WS; size_t bytes = 0;
  for (auto [n,k] : sh) { int8_t* w = (int8_t*)aligned_alloc(64, (size_t)n*k); for (size_t i=0;i<(size_t)n*k;i++) w[i]=(int8_t)(rand()%255-127);
    W.push_back(w); bytes += (size_t)n*k; S.push_back(new float[n]()); Y.push_back(new float[n]); X.push_back(new float[k]()); XQ.push_back(new uint8_t[k+64]()); WS.push_back(new int32_t[n]()); }
  for (int mode = 0; mode < 2; mode++) { double best = 1e9;
    for (int r = 0; r < 30; r++) { auto t0 = std::chrono::steady_clock::now();
      #pragma omp parallel num_threads(2)
      { for (size_t i = 0; i < sh.size(); i++) { if (mode == 0) gemv_f32(X[i], W[i], S[i], Y[i], sh[i].first, sh[i].second);
          else gemv_vnni(XQ[i], 1.f, W[i], WS[i], S[i], Y[i], sh[i].first, sh[i].second); } }
      double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); if (t < best) best = t; }
    printf("%s %.2f ms %.1f GB/s\n", mode ? "vnni" : "f32cvt", best*1e3, bytes/best/1e9); }
}
