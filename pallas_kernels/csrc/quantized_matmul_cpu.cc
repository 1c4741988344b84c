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
// dot over the group's k (vectorised with `omp simd`), scaled. Output columns are split over threads.
#include <algorithm>
#include <cstdint>
#include <vector>

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
    const int64_t n0 = std::min(N, t * chunk), n1 = std::min(N, n0 + chunk);
    if (n0 >= n1) continue;
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
