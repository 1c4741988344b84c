// y [M, N] = x [M, K] @ W for W stored quantized in groups of G inputs (jaxinfer/quantization.py):
//   bits 8: q int8 [K, N];  bits 4: q uint8 [K/2, N], byte j of a group = rows j (low) and j + G/2 (high)
//   transpose: q [N, K] / [N, K/2] (an embedding used as the output projection), groups along K
//   W[k, n] = q[k, n] * scale[k / G, n] + offset[k / G, n]
// An XLA FFI custom call for the CPU: the int8 / int4 values are read once from memory and turned
// into floats in registers, which no XLA:CPU fusion of a dequantize and a dot does (docs/BENCHMARKS.md).
//
// [K, N] layout: per group, acc[m, n] = sum_k x[m, k] * q[k, n] streams q's rows (n contiguous, so the
// int -> float conversion and the FMA vectorise over n), then y += acc * scale + sum(x_g) * offset:
// one multiply by the scale per group, not per weight. [N, K] layout: per output n, per group, a
// dot over the group's k, scaled. Output columns are split over threads.
//
// With AVX2 + FMA (x86-64 since 2013) both layouts run explicit vector code on up to 4 rows of x at
// a time: [K, N] keeps a block of 16-32 outputs per row in registers for a whole group (8 weights
// converted per load: int8 -> int32 -> float, or two nibbles); [N, K] takes 2-4 outputs at once, a
// vector accumulator per output and group scaled once, one horizontal sum per output at the end
// (the plain loops compiled to 6-8 G weights/s, their per-group horizontal sums and accumulators
// kept in memory being the limit). Columns past the last whole block, other CPUs and groups the
// vector code does not take (int8: a multiple of 8; int4: of 16) use the plain loops.
#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define JAXINFER_AVX2 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kFuseRows = 4;
constexpr int64_t kThreadedWeights = int64_t{1} << 19;

template <int BITS>
void MatmulKN(const float* x, const uint8_t* q, const float* s, const float* o, float* y, int64_t M, int64_t K,
              int64_t N, int64_t G, int64_t n0, int64_t n1) {
  const int64_t W = n1 - n0;
  std::vector<float> acc(M * W), lo(W), hi(W);
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + n0, y + m * N + n1, 0.0f);
  for (int64_t g = 0; g < K / G; ++g) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    if (BITS == 8 && M <= kFuseRows) {  // few rows: convert inside the FMA loop, one pass over the row
      for (int64_t j = 0; j < G; ++j) {
        const int8_t* row = reinterpret_cast<const int8_t*>(q) + (g * G + j) * N + n0;
        for (int64_t m = 0; m < M; ++m) {
          const float xv = x[m * K + g * G + j];
          float* a = acc.data() + m * W;
          for (int64_t n = 0; n < W; ++n) a[n] += xv * static_cast<float>(row[n]);
        }
      }
    } else if (BITS == 8) {  // many rows: convert the row once into floats, reuse it for every row of x
      for (int64_t j = 0; j < G; ++j) {
        const int8_t* row = reinterpret_cast<const int8_t*>(q) + (g * G + j) * N + n0;
        for (int64_t n = 0; n < W; ++n) lo[n] = static_cast<float>(row[n]);
        for (int64_t m = 0; m < M; ++m) {
          const float xv = x[m * K + g * G + j];
          float* a = acc.data() + m * W;
          for (int64_t n = 0; n < W; ++n) a[n] += xv * lo[n];
        }
      }
    } else if (M <= kFuseRows) {
      for (int64_t j = 0; j < G / 2; ++j) {
        const uint8_t* row = q + (g * (G / 2) + j) * N + n0;
        for (int64_t m = 0; m < M; ++m) {
          const float xl = x[m * K + g * G + j], xh = x[m * K + g * G + G / 2 + j];
          float* a = acc.data() + m * W;
          for (int64_t n = 0; n < W; ++n)
            a[n] += xl * static_cast<float>(row[n] & 15) + xh * static_cast<float>(row[n] >> 4);
        }
      }
    } else {
      for (int64_t j = 0; j < G / 2; ++j) {
        const uint8_t* row = q + (g * (G / 2) + j) * N + n0;
        for (int64_t n = 0; n < W; ++n) {
          lo[n] = static_cast<float>(row[n] & 15);
          hi[n] = static_cast<float>(row[n] >> 4);
        }
        for (int64_t m = 0; m < M; ++m) {
          const float xl = x[m * K + g * G + j], xh = x[m * K + g * G + G / 2 + j];
          float* a = acc.data() + m * W;
          for (int64_t n = 0; n < W; ++n) a[n] += xl * lo[n] + xh * hi[n];
        }
      }
    }
    const float* sg = s + g * N + n0;
    const float* og = o ? o + g * N + n0 : nullptr;
    for (int64_t m = 0; m < M; ++m) {
      float xsum = 0.0f;
      for (int64_t k = 0; k < G; ++k) xsum += x[m * K + g * G + k];
      float* yr = y + m * N + n0;
      const float* a = acc.data() + m * W;
      if (og) {
        for (int64_t n = 0; n < W; ++n) yr[n] += a[n] * sg[n] + xsum * og[n];
      } else {
        for (int64_t n = 0; n < W; ++n) yr[n] += a[n] * sg[n];
      }
    }
  }
}

template <int BITS>
void MatmulNK(const float* x, const uint8_t* q, const float* s, const float* o, float* y, int64_t M, int64_t K,
              int64_t N, int64_t G, int64_t n0, int64_t n1) {
  const int64_t NG = K / G, row_bytes = BITS == 8 ? K : K / 2;
  std::vector<float> xsum(M * NG, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * NG + k / G] += x[m * K + k];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = q + n * row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float total = 0.0f;
      for (int64_t g = 0; g < NG; ++g) {
        float d = 0.0f;
        if (BITS == 8) {
          const int8_t* r = reinterpret_cast<const int8_t*>(row) + g * G;
#pragma omp simd reduction(+ : d)
          for (int64_t j = 0; j < G; ++j) d += xm[g * G + j] * static_cast<float>(r[j]);
        } else {
          const uint8_t* r = row + g * (G / 2);
#pragma omp simd reduction(+ : d)
          for (int64_t j = 0; j < G / 2; ++j)
            d += xm[g * G + j] * static_cast<float>(r[j] & 15) + xm[g * G + G / 2 + j] * static_cast<float>(r[j] >> 4);
        }
        total += d * s[n * NG + g] + (o ? xsum[m * NG + g] * o[n * NG + g] : 0.0f);
      }
      y[m * N + n] = total;
    }
  }
}


#ifdef JAXINFER_AVX2
inline __m256 Int8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline void Nibbles8(const uint8_t* p, __m256* lo, __m256* hi) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  *lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Software prefetch. [K, N] blocks read a group's rows as G (int8) or G / 2 (int4) streams N bytes
// apart, more than the hardware prefetcher follows: each row of a block asks for the line
// kPrefetchBytes further along its walk (wrapping into the next group). [N, K] blocks ask, per group,
// for the same group of the next block's outputs. One thread, SmolLM2's layers at one row: int8
// 6.6 -> 9-9.5 GB/s of stored weights, int4 5.8 -> 7 GB/s; the 49,152 x 576 int8 head 5.5 -> 11.7 GB/s
// (a plain read streams 13-17 GB/s on one core here; 64 bytes ahead gained nothing, 512 no more).
constexpr int64_t kPrefetchBytes = 256;

inline void Prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// y[m, n : n + 8V] += group g's part, for rows m < MR of x (row stride K, y's N), [K, N] layout.
// xsum: [MR, K / G]. Called for every block [n0, end) of a group before the next group, so the weights
// are read in memory order (a block walking down all K rows first reads one line per row, N bytes apart,
// and ran at a third of the memory bandwidth).
template <int BITS, int MR, int V>
void GroupKN(const float* x, const uint8_t* q, const float* s, const float* o, const float* xsum, float* y,
             int64_t K, int64_t N, int64_t G, int64_t g, int64_t n, int64_t n0, int64_t end) {
  const int64_t NG = K / G, group_rows = BITS == 8 ? G : G / 2;
  int64_t ahead = n + kPrefetchBytes, ahead_group = g;
  if (ahead >= end) {
    ahead = n0 + (ahead - end);
    ++ahead_group;
  }
  const uint8_t* pf = ahead_group < NG ? q + ahead_group * group_rows * N + ahead : nullptr;
  __m256 acc[MR][V];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = _mm256_setzero_ps();
  if (BITS == 8) {
    for (int64_t j = 0; j < G; ++j) {
      const int8_t* row = reinterpret_cast<const int8_t*>(q) + (g * G + j) * N + n;
      if (pf) Prefetch(pf + j * N);
      for (int v = 0; v < V; ++v) {
        const __m256 w = Int8x8(row + 8 * v);
        for (int m = 0; m < MR; ++m) acc[m][v] = _mm256_fmadd_ps(_mm256_set1_ps(x[m * K + g * G + j]), w, acc[m][v]);
      }
    }
  } else {
    for (int64_t j = 0; j < G / 2; ++j) {
      const uint8_t* row = q + (g * (G / 2) + j) * N + n;
      if (pf) Prefetch(pf + j * N);
      for (int v = 0; v < V; ++v) {
        __m256 lo, hi;
        Nibbles8(row + 8 * v, &lo, &hi);
        for (int m = 0; m < MR; ++m) {
          const __m256 xl = _mm256_set1_ps(x[m * K + g * G + j]), xh = _mm256_set1_ps(x[m * K + g * G + G / 2 + j]);
          acc[m][v] = _mm256_fmadd_ps(xh, hi, _mm256_fmadd_ps(xl, lo, acc[m][v]));
        }
      }
    }
  }
  for (int v = 0; v < V; ++v) {
    const __m256 sv = _mm256_loadu_ps(s + g * N + n + 8 * v);
    const __m256 ov = o ? _mm256_loadu_ps(o + g * N + n + 8 * v) : _mm256_setzero_ps();
    for (int m = 0; m < MR; ++m) {
      float* yp = y + m * N + n + 8 * v;
      __m256 out = _mm256_fmadd_ps(acc[m][v], sv, _mm256_loadu_ps(yp));
      if (o) out = _mm256_fmadd_ps(_mm256_set1_ps(xsum[m * NG + g]), ov, out);
      _mm256_storeu_ps(yp, out);
    }
  }
}

// y[m, n : n + NR] for rows m < MR (<= 4), outputs r < NR (<= 4), [N, K] layout (q's rows of K / (8 / BITS)
// bytes). Each weight vector is multiplied by its group's scale as it is converted, so one accumulator
// per (row, output) sums the whole row (a second set folding each group's sum by its scale doubled the
// registers and spilled: 7-8 G weights/s against 12-16 for the [K, N] blocks). The accumulators are
// named variables, c<row><output>, for the reason the panel kernels' note below gives; the offsets'
// share (sum over groups of xsum * offset) is added at the end.
#define JAXINFER_FMA_ROW(i, r, w, xk) \
  if constexpr (MR > i) c##i##r = _mm256_fmadd_ps(_mm256_loadu_ps((xk) + (i) * K), (w), c##i##r);
#define JAXINFER_FMA_ROWS(r, w, xk) \
  JAXINFER_FMA_ROW(0, r, w, xk) JAXINFER_FMA_ROW(1, r, w, xk) JAXINFER_FMA_ROW(2, r, w, xk) JAXINFER_FMA_ROW(3, r, w, xk)
#define JAXINFER_OUTPUTS(X) X(0) X(1) X(2) X(3)

template <int BITS, int MR, int NR>
void BlockNK(const float* x, const uint8_t* q, const float* s, const float* o, const float* xsum, float* y,
             int64_t K, int64_t N, int64_t G, int64_t n) {
  static_assert(MR <= 4 && NR <= 4, "16 named accumulators at most");
  const int64_t NG = K / G, row_bytes = BITS == 8 ? K : K / 2;
#define JAXINFER_ZERO(r) __m256 c0##r = _mm256_setzero_ps(), c1##r = c0##r, c2##r = c0##r, c3##r = c0##r;
  JAXINFER_OUTPUTS(JAXINFER_ZERO)
#undef JAXINFER_ZERO
  for (int64_t g = 0; g < NG; ++g) {
    for (int r = 0; r < NR && n + NR + r < N; ++r) Prefetch(q + (n + NR + r) * row_bytes + g * (row_bytes / NG));
    if (BITS == 8) {
      for (int64_t k = 0; k < G; k += 8) {
        const float* xk = x + g * G + k;
#define JAXINFER_INT8(r)                                                                                 \
        if constexpr (NR > r) {                                                                          \
          const int8_t* p = reinterpret_cast<const int8_t*>(q) + (n + r) * row_bytes + g * G + k;         \
          const __m256 w = _mm256_mul_ps(Int8x8(p), _mm256_broadcast_ss(s + (n + r) * NG + g));         \
          JAXINFER_FMA_ROWS(r, w, xk)                                                                    \
        }
        JAXINFER_OUTPUTS(JAXINFER_INT8)
#undef JAXINFER_INT8
      }
    } else {
      for (int64_t j = 0; j < G / 2; j += 8) {
        const float* xl = x + g * G + j;
        const float* xh = xl + G / 2;
#define JAXINFER_INT4(r)                                                                                 \
        if constexpr (NR > r) {                                                                          \
          __m256 lo, hi;                                                                                 \
          Nibbles8(q + (n + r) * row_bytes + g * (G / 2) + j, &lo, &hi);                                 \
          const __m256 sv = _mm256_broadcast_ss(s + (n + r) * NG + g);                                   \
          const __m256 wl = _mm256_mul_ps(lo, sv), wh = _mm256_mul_ps(hi, sv);                          \
          JAXINFER_FMA_ROWS(r, wl, xl)                                                                   \
          JAXINFER_FMA_ROWS(r, wh, xh)                                                                   \
        }
        JAXINFER_OUTPUTS(JAXINFER_INT4)
#undef JAXINFER_INT4
      }
    }
  }
#define JAXINFER_STORE_ROW(i, r)                                                                         \
  if constexpr (MR > i) {                                                                                \
    float off = 0.0f;                                                                                    \
    if (o)                                                                                               \
      for (int64_t g = 0; g < NG; ++g) off += xsum[(i) * NG + g] * o[(n + r) * NG + g];                  \
    y[(i) * N + n + r] = HorizontalSum(c##i##r) + off;                                                   \
  }
#define JAXINFER_STORE(r) \
  if constexpr (NR > r) { JAXINFER_STORE_ROW(0, r) JAXINFER_STORE_ROW(1, r) JAXINFER_STORE_ROW(2, r) JAXINFER_STORE_ROW(3, r) }
  JAXINFER_OUTPUTS(JAXINFER_STORE)
#undef JAXINFER_STORE
#undef JAXINFER_STORE_ROW
}
#undef JAXINFER_FMA_ROWS
#undef JAXINFER_FMA_ROW
#undef JAXINFER_OUTPUTS

// Rows [m0, m0 + MR) and columns [n0, n1) on the vector blocks; returns the first column they left.
template <int BITS, int MR>
int64_t VectorRows(bool transpose, const float* x, const uint8_t* q, const float* s, const float* o,
                   const float* xsum, float* y, int64_t K, int64_t N, int64_t G, int64_t n0, int64_t n1) {
  constexpr int V = MR == 1 ? 8 : MR == 2 ? 4 : 2;  // [K, N]: 8V outputs a block, MR * V accumulators
  constexpr int NR = MR <= 3 ? 4 : 3;  // [N, K]: outputs a block (MR x NR <= 12 accumulators)
  int64_t n = n0;
  if (transpose) {
    for (; n + NR <= n1; n += NR) BlockNK<BITS, MR, NR>(x, q, s, o, xsum, y, K, N, G, n);
  } else {
    const int64_t end = n0 + (n1 - n0) / (8 * V) * (8 * V);
    for (int m = 0; m < MR; ++m) std::fill(y + m * N + n0, y + m * N + end, 0.0f);
    for (int64_t g = 0; g < K / G; ++g)
      for (int64_t b = n0; b < end; b += 8 * V) GroupKN<BITS, MR, V>(x, q, s, o, xsum, y, K, N, G, g, b, n0, end);
    n = end;
  }
  return n;
}

// The vector path for rows [0, M), columns [n0, n1): returns the first column left to the plain loops
// (n0 when the group does not suit the vector code).
template <int BITS>
int64_t MatmulVector(bool transpose, const float* x, const uint8_t* q, const float* s, const float* o, float* y,
                     int64_t M, int64_t K, int64_t N, int64_t G, int64_t n0, int64_t n1) {
  if (G % (BITS == 8 ? 8 : 16) != 0) return n0;
  const int64_t NG = K / G;
  std::vector<float> xsum(M * NG, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * NG + k / G] += x[m * K + k];
  int64_t done = n1;
  for (int64_t m = 0; m < M; m += 4) {
    const float* xm = x + m * K;
    const float* xs = xsum.data() + m * NG;
    float* ym = y + m * N;
    int64_t left;
    switch (std::min<int64_t>(4, M - m)) {
      case 1: left = VectorRows<BITS, 1>(transpose, xm, q, s, o, xs, ym, K, N, G, n0, n1); break;
      case 2: left = VectorRows<BITS, 2>(transpose, xm, q, s, o, xs, ym, K, N, G, n0, n1); break;
      case 3: left = VectorRows<BITS, 3>(transpose, xm, q, s, o, xs, ym, K, N, G, n0, n1); break;
      default: left = VectorRows<BITS, 4>(transpose, xm, q, s, o, xs, ym, K, N, G, n0, n1); break;
    }
    done = std::min(done, left);
  }
  return done;
}

// ---- Many rows (a batch of decode steps): dequantize a panel of W once, reuse it for every row ----
// The blocks above convert each weight once per 4 rows of x, so at 32 rows they read and convert the
// whole matrix 8 times. Here a panel of W (KC inputs x NC outputs) is dequantized into floats
// (values * scale + offset, in cache) once per call, then a register-blocked float kernel runs every
// row of x over it: the conversion is paid once per weight, the FMAs run from L1 / L2 like a float GEMM.

constexpr int64_t kPanelOutputs = 64;   // [K, N]: NC, outputs a panel (4 strips of 16)
constexpr int64_t kPanelInputs = 256;   // [K, N]: KC target (whole groups): a 64 KB panel in L2
constexpr int64_t kPanelOutputsNK = 24; // [N, K]: NC (8 blocks of 3 outputs), KC = K up to kPanelInputsNK
constexpr int64_t kPanelInputsNK = 2048;

// panel[k - k0][n - n0] = W[k, n] for k in [k0, k0 + kc) (whole groups), n in [n0, n0 + nc) (nc % 8 == 0)
template <int BITS>
void DequantKN(const uint8_t* q, const float* s, const float* o, float* panel, int64_t N, int64_t G, int64_t k0,
               int64_t kc, int64_t n0, int64_t nc) {
  for (int64_t g = k0 / G; g < (k0 + kc) / G; ++g) {
    const float* sg = s + g * N + n0;
    const float* og = o ? o + g * N + n0 : nullptr;
    if (BITS == 8) {
      for (int64_t j = 0; j < G; ++j) {
        const int8_t* row = reinterpret_cast<const int8_t*>(q) + (g * G + j) * N + n0;
        float* out = panel + (g * G + j - k0) * nc;
        for (int64_t n = 0; n < nc; n += 8) {
          __m256 w = _mm256_mul_ps(Int8x8(row + n), _mm256_loadu_ps(sg + n));
          if (og) w = _mm256_add_ps(w, _mm256_loadu_ps(og + n));
          _mm256_storeu_ps(out + n, w);
        }
      }
    } else {
      for (int64_t j = 0; j < G / 2; ++j) {
        const uint8_t* row = q + (g * (G / 2) + j) * N + n0;
        float* out_lo = panel + (g * G + j - k0) * nc;
        float* out_hi = panel + (g * G + G / 2 + j - k0) * nc;
        for (int64_t n = 0; n < nc; n += 8) {
          __m256 lo, hi;
          Nibbles8(row + n, &lo, &hi);
          const __m256 sv = _mm256_loadu_ps(sg + n), ov = _mm256_loadu_ps(og + n);
          _mm256_storeu_ps(out_lo + n, _mm256_add_ps(_mm256_mul_ps(lo, sv), ov));
          _mm256_storeu_ps(out_hi + n, _mm256_add_ps(_mm256_mul_ps(hi, sv), ov));
        }
      }
    }
  }
}

// The panel kernels keep their accumulators in named registers (one variable per row and vector,
// `JAXINFER_ROWS` below): written as arrays indexed in loops, GCC 12 kept them in registers but also
// stored every one to the stack on every step of the k loop whenever the sizes were not compile-time
// constants (28 against 72 G FLOP/s on one core, seen in the assembly and timed).
#define JAXINFER_ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define JAXINFER_ROWS4(X) X(0) X(1) X(2) X(3)

// y[m, n : n + 16] += x[m, k0 : k0 + kc] @ panel[:, j : j + 16] for rows m < MR (<= 6)
template <int MR>
void PanelKN(const float* x, const float* panel, float* y, int64_t K, int64_t N, int64_t k0, int64_t kc, int64_t nc,
             int64_t j, int64_t n) {
#define JAXINFER_ZERO(i) __m256 lo##i = _mm256_setzero_ps(), hi##i = _mm256_setzero_ps();
  JAXINFER_ROWS6(JAXINFER_ZERO)
#undef JAXINFER_ZERO
  const float* p = panel + j;
  const float* xk = x + k0;
  for (int64_t k = 0; k < kc; ++k, p += nc, ++xk) {
    const __m256 b0 = _mm256_loadu_ps(p), b1 = _mm256_loadu_ps(p + 8);
#define JAXINFER_FMA(i)                                          \
    if constexpr (MR > i) {                                      \
      const __m256 a = _mm256_broadcast_ss(xk + i * K);          \
      lo##i = _mm256_fmadd_ps(a, b0, lo##i);                     \
      hi##i = _mm256_fmadd_ps(a, b1, hi##i);                     \
    }
    JAXINFER_ROWS6(JAXINFER_FMA)
#undef JAXINFER_FMA
  }
#define JAXINFER_STORE(i)                                                      \
  if constexpr (MR > i) {                                                      \
    float* yp = y + i * N + n;                                                 \
    _mm256_storeu_ps(yp, _mm256_add_ps(_mm256_loadu_ps(yp), lo##i));           \
    _mm256_storeu_ps(yp + 8, _mm256_add_ps(_mm256_loadu_ps(yp + 8), hi##i));   \
  }
  JAXINFER_ROWS6(JAXINFER_STORE)
#undef JAXINFER_STORE
}

// panel[n - n0][k - k0] = W[k, n] for the [N, K] layout (rows of K / (8 / BITS) bytes), nc outputs
template <int BITS>
void DequantNK(const uint8_t* q, const float* s, const float* o, float* panel, int64_t K, int64_t G, int64_t k0,
               int64_t kc, int64_t n0, int64_t nc) {
  const int64_t NG = K / G, row_bytes = BITS == 8 ? K : K / 2;
  for (int64_t r = 0; r < nc; ++r) {
    const uint8_t* row = q + (n0 + r) * row_bytes;
    float* out = panel + r * kc - k0;
    for (int64_t g = k0 / G; g < (k0 + kc) / G; ++g) {
      const __m256 sv = _mm256_set1_ps(s[(n0 + r) * NG + g]);
      const __m256 ov = o ? _mm256_set1_ps(o[(n0 + r) * NG + g]) : _mm256_setzero_ps();
      if (BITS == 8) {
        for (int64_t k = 0; k < G; k += 8) {
          __m256 w = _mm256_mul_ps(Int8x8(reinterpret_cast<const int8_t*>(row) + g * G + k), sv);
          if (o) w = _mm256_add_ps(w, ov);
          _mm256_storeu_ps(out + g * G + k, w);
        }
      } else {
        for (int64_t j = 0; j < G / 2; j += 8) {
          __m256 lo, hi;
          Nibbles8(row + g * (G / 2) + j, &lo, &hi);
          _mm256_storeu_ps(out + g * G + j, _mm256_add_ps(_mm256_mul_ps(lo, sv), ov));
          _mm256_storeu_ps(out + g * G + G / 2 + j, _mm256_add_ps(_mm256_mul_ps(hi, sv), ov));
        }
      }
    }
  }
}

// y[m, n + r] += x[m, k0 : k0 + kc] . panel[j + r, :] for rows m < MR (<= 4), r < 3 (kc % 8 == 0):
// 12 accumulators, 3 weight vectors and one of x fill the 16 registers
template <int MR>
void PanelNK(const float* x, const float* panel, float* y, int64_t K, int64_t N, int64_t k0, int64_t kc, int64_t j,
             int64_t n) {
#define JAXINFER_ZERO(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0;
  JAXINFER_ROWS4(JAXINFER_ZERO)
#undef JAXINFER_ZERO
  const float* p = panel + j * kc;
  for (int64_t k = 0; k < kc; k += 8) {
    const __m256 w0 = _mm256_loadu_ps(p + k), w1 = _mm256_loadu_ps(p + kc + k), w2 = _mm256_loadu_ps(p + 2 * kc + k);
#define JAXINFER_FMA(i)                                          \
    if constexpr (MR > i) {                                      \
      const __m256 a = _mm256_loadu_ps(x + i * K + k0 + k);      \
      c##i##0 = _mm256_fmadd_ps(a, w0, c##i##0);                 \
      c##i##1 = _mm256_fmadd_ps(a, w1, c##i##1);                 \
      c##i##2 = _mm256_fmadd_ps(a, w2, c##i##2);                 \
    }
    JAXINFER_ROWS4(JAXINFER_FMA)
#undef JAXINFER_FMA
  }
#define JAXINFER_STORE(i)                               \
  if constexpr (MR > i) {                               \
    y[i * N + n] += HorizontalSum(c##i##0);             \
    y[i * N + n + 1] += HorizontalSum(c##i##1);         \
    y[i * N + n + 2] += HorizontalSum(c##i##2);         \
  }
  JAXINFER_ROWS4(JAXINFER_STORE)
#undef JAXINFER_STORE
}

template <int MR>
void PanelRows(bool transpose, const float* x, const float* panel, float* y, int64_t K, int64_t N, int64_t k0,
               int64_t kc, int64_t nc, int64_t j, int64_t n) {
  if constexpr (MR <= 4) {
    if (transpose) return PanelNK<MR>(x, panel, y, K, N, k0, kc, j, n);
  }
  PanelKN<MR>(x, panel, y, K, N, k0, kc, nc, j, n);
}

// Rows [0, M), columns [n0, n1) through dequantized panels; returns the first column left to the
// plain loops (whole strips of 16 / blocks of 3 outputs only; n0 when the group does not suit).
template <int BITS>
int64_t MatmulPanels(bool transpose, const float* x, const uint8_t* q, const float* s, const float* o, float* y,
                     int64_t M, int64_t K, int64_t N, int64_t G, int64_t n0, int64_t n1) {
  if (G % (BITS == 8 ? 8 : 16) != 0) return n0;
  const int64_t strip = transpose ? 3 : 16;
  const int64_t NC = transpose ? kPanelOutputsNK : kPanelOutputs;
  const int64_t target = transpose ? kPanelInputsNK : kPanelInputs;
  const int64_t KC = std::max<int64_t>(1, target / G) * G;
  const int64_t end = n0 + (n1 - n0) / strip * strip;
  std::vector<float> panel(NC * std::min(KC, K));
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + n0, y + m * N + end, 0.0f);
  for (int64_t nb = n0; nb < end; nb += NC) {
    const int64_t nc = std::min(NC, end - nb);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      if (transpose) DequantNK<BITS>(q, s, o, panel.data(), K, G, k0, kc, nb, nc);
      else DequantKN<BITS>(q, s, o, panel.data(), N, G, k0, kc, nb, nc);
      for (int64_t j = 0; j < nc; j += strip) {
        int64_t m = 0;
        if (transpose) {
          for (; m + 4 <= M; m += 4) PanelRows<4>(true, x + m * K, panel.data(), y + m * N, K, N, k0, kc, nc, j, nb + j);
        } else {
          for (; m + 6 <= M; m += 6) PanelRows<6>(false, x + m * K, panel.data(), y + m * N, K, N, k0, kc, nc, j, nb + j);
        }
        switch (M - m) {
          case 1: PanelRows<1>(transpose, x + m * K, panel.data(), y + m * N, K, N, k0, kc, nc, j, nb + j); break;
          case 2: PanelRows<2>(transpose, x + m * K, panel.data(), y + m * N, K, N, k0, kc, nc, j, nb + j); break;
          case 3: PanelRows<3>(transpose, x + m * K, panel.data(), y + m * N, K, N, k0, kc, nc, j, nb + j); break;
          case 4: PanelRows<4>(transpose, x + m * K, panel.data(), y + m * N, K, N, k0, kc, nc, j, nb + j); break;
          case 5: PanelRows<5>(transpose, x + m * K, panel.data(), y + m * N, K, N, k0, kc, nc, j, nb + j); break;
          default: break;
        }
      }
    }
  }
  return end;
}
#endif

// One weight of a call: its stored arrays, its output and where its columns sit in the call's joint
// column space.
struct Weight {
  const uint8_t* q;
  const float* s;
  const float* o;  // nullptr: no offset
  float* y;
  int64_t N, bits, G, first;
};

// y[:, n0 : n1) of one weight: the vector / panel blocks take whole blocks of columns, the plain
// loops the rest.
void Columns(const Weight& w, bool transpose, const float* x, int64_t M, int64_t K, int64_t panel_rows, int64_t n0,
             int64_t n1) {
#ifdef JAXINFER_AVX2
  if (M >= panel_rows) {
    n0 = w.bits == 8 ? MatmulPanels<8>(transpose, x, w.q, w.s, w.o, w.y, M, K, w.N, w.G, n0, n1)
                     : MatmulPanels<4>(transpose, x, w.q, w.s, w.o, w.y, M, K, w.N, w.G, n0, n1);
  } else {
    n0 = w.bits == 8 ? MatmulVector<8>(transpose, x, w.q, w.s, w.o, w.y, M, K, w.N, w.G, n0, n1)
                     : MatmulVector<4>(transpose, x, w.q, w.s, w.o, w.y, M, K, w.N, w.G, n0, n1);
  }
  if (n0 >= n1) return;
#endif
  if (transpose) {
    if (w.bits == 8) MatmulNK<8>(x, w.q, w.s, w.o, w.y, M, K, w.N, w.G, n0, n1);
    else MatmulNK<4>(x, w.q, w.s, w.o, w.y, M, K, w.N, w.G, n0, n1);
  } else {
    if (w.bits == 8) MatmulKN<8>(x, w.q, w.s, w.o, w.y, M, K, w.N, w.G, n0, n1);
    else MatmulKN<4>(x, w.q, w.s, w.o, w.y, M, K, w.N, w.G, n0, n1);
  }
}

// y_i = x @ W_i for every weight i of the call (q/k/v, or gate/up: one input, several outputs).
// args after x: (q, scale, offset) per weight; bits / group / has_offset: one entry per weight.
ffi::Error QuantizedMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets rets,
                               ffi::Span<const int64_t> bits, ffi::Span<const int64_t> group,
                               ffi::Span<const int64_t> has_offset, int64_t transpose, int64_t threads,
                               int64_t panel_rows) {
  const auto xd = x.dimensions();
  const size_t count = rets.size();
  if (xd.size() != 2 || args.size() != 3 * count || bits.size() != count || group.size() != count ||
      has_offset.size() != count)
    return ffi::Error::InvalidArgument("quantized_matmul_cpu: x must be 2-D, with (q, scale, offset), bits, group "
                                       "and has_offset for every output");
  const int64_t M = xd[0], K = xd[1];
  std::vector<Weight> weights;
  int64_t total = 0;
  for (size_t i = 0; i < count; ++i) {
    auto q = args.get<ffi::AnyBuffer>(3 * i);
    auto scale = args.get<ffi::Buffer<ffi::F32>>(3 * i + 1);
    auto offset = args.get<ffi::Buffer<ffi::F32>>(3 * i + 2);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (q.has_error() || scale.has_error() || offset.has_error() || y.has_error())
      return ffi::Error::InvalidArgument("quantized_matmul_cpu: a weight's arrays or output have the wrong type");
    const auto yd = (*y)->dimensions();
    if (yd.size() != 2 || yd[0] != M || (bits[i] != 4 && bits[i] != 8) || group[i] <= 0 || K % group[i] != 0 ||
        (bits[i] == 4 && group[i] % 2 != 0))
      return ffi::Error::InvalidArgument("quantized_matmul_cpu: outputs [M, N], bits 4 or 8, a group dividing K "
                                         "(even for int4)");
    weights.push_back({static_cast<const uint8_t*>(q->untyped_data()), scale->typed_data(),
                       has_offset[i] ? offset->typed_data() : nullptr, (*y)->typed_data(), yd[1], bits[i], group[i],
                       total});
    total += yd[1];
  }
  const float* xp = x.typed_data();
  // Threads only for enough work: waking a second thread costs more than a small matvec (measured on
  // 2 cores: SmolLM2's q/k/v/o projections each ran faster on one thread, its MLP and lm_head on two).
  // The work grows with the rows (a weight counts once per 4 rows of x) and with the weights of the
  // call: q, k and v together are one threaded call. Threads split the joint columns in blocks of 64.
  const int64_t work = K * total * ((M + 3) / 4);
  const int64_t T = work < kThreadedWeights ? 1 : std::max<int64_t>(1, std::min<int64_t>(threads, total / 64));
  const int64_t chunk = ((total + T - 1) / T + 63) / 64 * 64;
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t a = t * chunk, b = std::min(total, a + chunk);
    for (const Weight& w : weights) {
      const int64_t n0 = std::max<int64_t>(0, a - w.first), n1 = std::min(w.N, b - w.first);
      if (n0 < n1) Columns(w, transpose, xp, M, K, panel_rows, n0, n1);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferQuantizedMatmul, QuantizedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("bits")
                                  .Attr<ffi::Span<const int64_t>>("group")
                                  .Attr<ffi::Span<const int64_t>>("has_offset")
                                  .Attr<int64_t>("transpose")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("panel_rows"));
