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

// y[m, n : n + 8V] += group g's part, for rows m < MR of x (row stride K, y's N), [K, N] layout.
// xsum: [MR, K / G]. Called for every block of a group before the next group, so the weights are
// read in memory order (a block walking down all K rows first reads one line per row, N bytes apart,
// and ran at a third of the memory bandwidth).
template <int BITS, int MR, int V>
void GroupKN(const float* x, const uint8_t* q, const float* s, const float* o, const float* xsum, float* y,
             int64_t K, int64_t N, int64_t G, int64_t g, int64_t n) {
  const int64_t NG = K / G;
  __m256 acc[MR][V];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = _mm256_setzero_ps();
  if (BITS == 8) {
    for (int64_t j = 0; j < G; ++j) {
      const int8_t* row = reinterpret_cast<const int8_t*>(q) + (g * G + j) * N + n;
      for (int v = 0; v < V; ++v) {
        const __m256 w = Int8x8(row + 8 * v);
        for (int m = 0; m < MR; ++m) acc[m][v] = _mm256_fmadd_ps(_mm256_set1_ps(x[m * K + g * G + j]), w, acc[m][v]);
      }
    }
  } else {
    for (int64_t j = 0; j < G / 2; ++j) {
      const uint8_t* row = q + (g * (G / 2) + j) * N + n;
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

// y[m, n : n + NR] for rows m < MR, [N, K] layout (q's rows of K / (8 / BITS) bytes).
template <int BITS, int MR, int NR>
void BlockNK(const float* x, const uint8_t* q, const float* s, const float* o, const float* xsum, float* y,
             int64_t K, int64_t N, int64_t G, int64_t n) {
  const int64_t NG = K / G, row_bytes = BITS == 8 ? K : K / 2;
  __m256 tot[MR][NR];
  float off[MR][NR] = {};
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) tot[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < NG; ++g) {
    __m256 acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
    if (BITS == 8) {
      for (int64_t k = 0; k < G; k += 8) {
        __m256 w[NR];
        for (int r = 0; r < NR; ++r)
          w[r] = Int8x8(reinterpret_cast<const int8_t*>(q) + (n + r) * row_bytes + g * G + k);
        for (int m = 0; m < MR; ++m) {
          const __m256 xv = _mm256_loadu_ps(x + m * K + g * G + k);
          for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(xv, w[r], acc[m][r]);
        }
      }
    } else {
      for (int64_t j = 0; j < G / 2; j += 8) {
        __m256 lo[NR], hi[NR];
        for (int r = 0; r < NR; ++r) Nibbles8(q + (n + r) * row_bytes + g * (G / 2) + j, &lo[r], &hi[r]);
        for (int m = 0; m < MR; ++m) {
          const __m256 xl = _mm256_loadu_ps(x + m * K + g * G + j);
          const __m256 xh = _mm256_loadu_ps(x + m * K + g * G + G / 2 + j);
          for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(xh, hi[r], _mm256_fmadd_ps(xl, lo[r], acc[m][r]));
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 sv = _mm256_set1_ps(s[(n + r) * NG + g]);
      for (int m = 0; m < MR; ++m) {
        tot[m][r] = _mm256_fmadd_ps(acc[m][r], sv, tot[m][r]);
        if (o) off[m][r] += xsum[m * NG + g] * o[(n + r) * NG + g];
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + n + r] = HorizontalSum(tot[m][r]) + off[m][r];
}

// Rows [m0, m0 + MR) and columns [n0, n1) on the vector blocks; returns the first column they left.
template <int BITS, int MR>
int64_t VectorRows(bool transpose, const float* x, const uint8_t* q, const float* s, const float* o,
                   const float* xsum, float* y, int64_t K, int64_t N, int64_t G, int64_t n0, int64_t n1) {
  constexpr int V = MR == 1 ? 8 : MR == 2 ? 4 : 2;  // [K, N]: 8V outputs a block, MR * V accumulators
  constexpr int NR = MR <= 2 ? 4 : 2;  // [N, K]: outputs a block
  int64_t n = n0;
  if (transpose) {
    for (; n + NR <= n1; n += NR) BlockNK<BITS, MR, NR>(x, q, s, o, xsum, y, K, N, G, n);
  } else {
    const int64_t end = n0 + (n1 - n0) / (8 * V) * (8 * V);
    for (int m = 0; m < MR; ++m) std::fill(y + m * N + n0, y + m * N + end, 0.0f);
    for (int64_t g = 0; g < K / G; ++g)
      for (int64_t b = n0; b < end; b += 8 * V) GroupKN<BITS, MR, V>(x, q, s, o, xsum, y, K, N, G, g, b);
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
#endif

ffi::Error QuantizedMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                               ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> y, int64_t bits,
                               int64_t group, int64_t transpose, int64_t has_offset, int64_t threads) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || (bits != 4 && bits != 8) || group <= 0)
    return ffi::Error::InvalidArgument("quantized_matmul_cpu: x and y must be 2-D, bits 4 or 8, group > 0");
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  if (K % group != 0 || (bits == 4 && group % 2 != 0))
    return ffi::Error::InvalidArgument("quantized_matmul_cpu: the group must divide K (and be even for int4)");
  const float* xp = x.typed_data();
  const auto* qp = static_cast<const uint8_t*>(q.untyped_data());
  const float* sp = scale.typed_data();
  const float* op = has_offset ? offset.typed_data() : nullptr;
  float* yp = y->typed_data();
  // Threads only for big matrices: waking a second thread costs more than a small matvec (measured on
  // 2 cores: SmolLM2's q/k/v/o projections ran faster on one thread, its MLP and lm_head on two).
  const int64_t T = K * N < kThreadedWeights ? 1 : std::max<int64_t>(1, std::min<int64_t>(threads, N / 64));
  const int64_t chunk = ((N + T - 1) / T + 15) / 16 * 16;
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    int64_t n0 = std::min(N, t * chunk);
    const int64_t n1 = std::min(N, n0 + chunk);
    if (n0 >= n1) continue;
#ifdef JAXINFER_AVX2
    // the vector blocks take whole blocks of columns; the plain loops below take the rest
    n0 = bits == 8 ? MatmulVector<8>(transpose, xp, qp, sp, op, yp, M, K, N, group, n0, n1)
                   : MatmulVector<4>(transpose, xp, qp, sp, op, yp, M, K, N, group, n0, n1);
    if (n0 >= n1) continue;
#endif
    if (transpose) {
      if (bits == 8) MatmulNK<8>(xp, qp, sp, op, yp, M, K, N, group, n0, n1);
      else MatmulNK<4>(xp, qp, sp, op, yp, M, K, N, group, n0, n1);
    } else {
      if (bits == 8) MatmulKN<8>(xp, qp, sp, op, yp, M, K, N, group, n0, n1);
      else MatmulKN<4>(xp, qp, sp, op, yp, M, K, N, group, n0, n1);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferQuantizedMatmul, QuantizedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("transpose")
                                  .Attr<int64_t>("has_offset")
                                  .Attr<int64_t>("threads"));
