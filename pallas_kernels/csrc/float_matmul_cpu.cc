// y [M, N] = x [M, K] @ W for float32 weights and few rows of x (a decode or verify step): an XLA FFI
// custom call for the CPU. XLA:CPU's dot reads a [576, 1536] float32 weight at 23 GB/s for one row
// of x but at 9-10 GB/s for 4-8 rows (docs/BENCHMARKS.md), so a step of a few tokens (a batch of 8,
// or one request verifying 3 drafts) cost 2-3x a step of one. Here every weight is read once per
// call whatever the rows (up to kMaxRows), so a step of 8 rows costs about what a step of 1 does.
//
//   W [K, N] (a projection):  per chunk of kChunk inputs, a block of 8V outputs for MR rows is kept
//     in MR x V vector registers (one FMA per row per 8 weights), then added into y; the blocks walk a
//     chunk's rows in memory order.
//   W [N, K] (transpose: an embedding used as the output projection): per block of NR outputs, one
//     accumulator per (row, output) over the whole of K (8 lanes), summed horizontally at the end.
//
// Exactly the same float operations for an output element whatever the number of rows, the block
// sizes or the threads: each element is sum over chunks (in order) of an FMA chain over the chunk,
// and [K, N] weights are always summed as two halves of K (the threads' split: one half each, or one
// thread doing both), so a step's logits do not depend on how many tokens it has (a verify step of
// 1 + k rows computes, for each row, bitwise what a decode step of that row alone computes).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define JAXINFER_AVX2 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 8;       // inputs per [K, N] accumulation chunk (8-64 measured; 8 best)
constexpr int64_t kMaxRows = 64;    // rows of x that share one read of W; more rows read it again
constexpr int64_t kThreadedBytes = int64_t{1} << 20;  // a call reading less runs on one thread

// The plain-C++ path (CPUs without AVX2 + FMA, and columns past the last whole vector): the same
// chunked order with fmaf, so every element is computed identically to the vector path.
void PlainKN(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t k0, int64_t k1,
             int64_t n0, int64_t n1, bool first) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float total = first ? 0.0f : y[m * N + n];
      bool have = !first;
      for (int64_t c = k0; c < k1; c += kChunk) {
        float acc = 0.0f;
        for (int64_t k = c; k < std::min(k1, c + kChunk); ++k) acc = std::fmaf(x[m * K + k], w[k * N + n], acc);
        total = have ? total + acc : acc;
        have = true;
      }
      y[m * N + n] = total;
    }
}

#ifdef JAXINFER_AVX2
// y[m, n : n + 8V] (+)= x[m, c : c + kChunk] @ W[c : c + kChunk, n : n + 8V] for rows m < MR (first: =).
// One whole chunk, a constant trip count: with a runtime one GCC 12 stored every accumulator to the
// stack after each FMA (seen in the assembly; 8 rows ran at 10 GB/s).
// Prefetch (PF): the same columns of the W rows kAheadChunks chunks below, into L2, one request per
// 64-byte line. A chunk's 8 rows are 8 short streams (N floats each) that the hardware prefetcher
// picks up late: SmolLM2's 30 layers at 4 rows read in 18-20 ms with it against 22-25 without, 1-2
// rows 17-19 against 20-24 (XLA's one-row dot 18-22; docs/BENCHMARKS.md). From 5 rows only the first
// group of 4 rows prefetches (its block of W is then in L1 for the others).
template <int MR, int V, bool PF = true>
inline void BlockKN(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t c, int64_t n,
                    bool first) {
  constexpr int64_t kAheadChunks = 8;  // 4 and 8 measured alike, 1-2 slower; into L1 (T0) slower
  __m256 acc[MR][V];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t k = c; k < c + kChunk; ++k) {
    const float* row = w + k * N + n;
    if (PF && k + kAheadChunks * kChunk < K)
      for (int v = 0; v < V; v += 2)  // (16 floats: one line)
        _mm_prefetch(reinterpret_cast<const char*>(row + kAheadChunks * kChunk * N + 8 * v), _MM_HINT_T1);
    for (int v = 0; v < V; ++v) {
      const __m256 wv = _mm256_loadu_ps(row + 8 * v);
      for (int m = 0; m < MR; ++m) acc[m][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + m * K + k), wv, acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v) {
      float* yp = y + m * N + n + 8 * v;
      _mm256_storeu_ps(yp, first ? acc[m][v] : _mm256_add_ps(_mm256_loadu_ps(yp), acc[m][v]));
    }
}

// Rows [0, M) x columns [n0, n1) over inputs [k0, k1): chunks outside, blocks inside, so a chunk's
// rows are read in memory order. Up to 4 rows, one block of 8V outputs holds MR x V accumulators;
// from 5 rows, every group of 4 rows takes the same block of W in turn while it is in L1 (one block
// of 8 rows held 8 accumulators and 8 broadcasts per weight vector: 13 GB/s at 8 rows, against 15-18
// this way; the rows past 8 read W again with the old blocks: 9 GB/s at 16). Whole chunks and whole
// vectors only: returns (the first input, the first column) the blocks left.
template <int V>
inline void GroupBlocks(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t c,
                        int64_t n, bool first) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    if (m == 0) BlockKN<4, V, true>(x, w, y, K, N, c, n, first);
    else BlockKN<4, V, false>(x + m * K, w, y + m * N, K, N, c, n, first);
  }
  switch (M - m) {
    case 1: BlockKN<1, V, false>(x + m * K, w, y + m * N, K, N, c, n, first); break;
    case 2: BlockKN<2, V, false>(x + m * K, w, y + m * N, K, N, c, n, first); break;
    case 3: BlockKN<3, V, false>(x + m * K, w, y + m * N, K, N, c, n, first); break;
    default: break;
  }
}

template <int MR>
std::pair<int64_t, int64_t> RowsKN(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                                   int64_t k0, int64_t k1, int64_t n0, int64_t n1, bool first) {
  constexpr int V = MR == 1 ? 8 : MR <= 3 ? 4 : 2;  // MR: M if at most 4, else 0 (groups of 4)
  const int64_t wide = n0 + (n1 - n0) / (8 * V) * (8 * V), narrow = n0 + (n1 - n0) / 8 * 8;
  const int64_t kend = k0 + (k1 - k0) / kChunk * kChunk;
  for (int64_t c = k0; c < kend; c += kChunk) {
    const bool f = first && c == k0;
    for (int64_t n = n0; n < wide; n += 8 * V) {
      if constexpr (MR > 0) BlockKN<MR, V>(x, w, y, K, N, c, n, f);
      else GroupBlocks<V>(x, w, y, M, K, N, c, n, f);
    }
    for (int64_t n = wide; n < narrow; n += 8) {
      if constexpr (MR > 0) BlockKN<MR, 1>(x, w, y, K, N, c, n, f);
      else GroupBlocks<1>(x, w, y, M, K, N, c, n, f);
    }
  }
  return {kend, narrow};
}
#endif

// y[:, n0:n1) (+)= x[:, k0:k1) @ W[k0:k1, n0:n1) (first: y is written, not added to).
void MatmulKN(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t k0, int64_t k1,
              int64_t n0, int64_t n1, bool first) {
  for (int64_t m = 0; m < M; m += kMaxRows) {
    const float* xm = x + m * K;
    float* ym = y + m * N;
    const int64_t rows = std::min(kMaxRows, M - m);
    std::pair<int64_t, int64_t> left{k0, n0};  // (first input, first column) the vector blocks left
#ifdef JAXINFER_AVX2
    switch (rows) {
      case 1: left = RowsKN<1>(xm, w, ym, 1, K, N, k0, k1, n0, n1, first); break;
      case 2: left = RowsKN<2>(xm, w, ym, 2, K, N, k0, k1, n0, n1, first); break;
      case 3: left = RowsKN<3>(xm, w, ym, 3, K, N, k0, k1, n0, n1, first); break;
      case 4: left = RowsKN<4>(xm, w, ym, 4, K, N, k0, k1, n0, n1, first); break;
      default: left = RowsKN<0>(xm, w, ym, rows, K, N, k0, k1, n0, n1, first); break;
    }
#endif
    const auto [kv, nv] = left;
    if (nv < n1) PlainKN(xm, w, ym, rows, K, N, k0, k1, nv, n1, first);  // columns past the last vector
    if (kv < k1 && n0 < nv) PlainKN(xm, w, ym, rows, K, N, kv, k1, n0, nv, first && kv == k0);  // a last partial chunk
  }
}

// [N, K]: y[m, n] = sum_k x[m, k] * w[n, k], 8 lanes each over all of K then summed horizontally
// (lane l holds k = l mod 8; a K not a multiple of 8 finishes with scalar FMAs on lane 0's total).
void PlainNK(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t k = 0; k < K8; k += 8)
        for (int l = 0; l < 8; ++l) lanes[l] = std::fmaf(x[m * K + k + l], w[n * K + k + l], lanes[l]);
      // the vector path's horizontal sum: (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then (0+1)
      float a0 = lanes[0] + lanes[4], a1 = lanes[1] + lanes[5], a2 = lanes[2] + lanes[6], a3 = lanes[3] + lanes[7];
      float b0 = a0 + a2, b1 = a1 + a3;
      float total = b0 + b1;
      for (int64_t k = K8; k < K; ++k) total = std::fmaf(x[m * K + k], w[n * K + k], total);
      y[m * N + n] = total;
    }
}

#ifdef JAXINFER_AVX2
inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // (0+4, 1+5, 2+6, 3+7)
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                         // (0+2, 1+3)
  s = _mm_add_ss(s, _mm_movehdup_ps(s));                                          // 0+1
  return _mm_cvtss_f32(s);
}

// Outputs [n, n + NR) for rows m < MR (MR x NR <= 12 accumulators), K a multiple of 8. Each cache
// line of the W rows two blocks ahead is prefetched as this block's line at the same offset is read
// (SmolLM2's [49152, 576] output head at 4 / 8 rows: 4.6-5.1 / 6.0-6.4 ms against 5.8 / 7.4-7.8
// without; one block ahead 5.1 / 6.6, four 6.3 / 9.8; only in the group of rows that reads W from
// memory first 5.7 / 7.3).
template <int MR, int NR>
void BlockNK(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n) {
  constexpr int64_t kAhead = 2 * NR;  // W rows
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  const bool prefetch = n + kAhead + NR <= N;
  for (int64_t k = 0; k < K; k += 8) {
    if (prefetch && k % 16 == 0)  // (16 floats: one 64-byte line)
      for (int r = 0; r < NR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (n + kAhead + r) * K + k), _MM_HINT_T0);
    __m256 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + (n + r) * K + k);
      for (int m = 0; m < MR; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + n + r] = HorizontalSum(acc[m][r]);
}

// Outputs [n0, n1) for all M rows: per block of 4 outputs (4 rows of W, L1-resident), every group of
// up to 3 rows of x. Returns the first output left (K not a multiple of 8: all of them).
int64_t VectorNK(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  if (K % 8 != 0) return n0;
  constexpr int NR = 4;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR)
    for (int64_t m = 0; m < M; m += 3) {
      const float* xm = x + m * K;
      float* ym = y + m * N;
      switch (std::min<int64_t>(3, M - m)) {
        case 1: BlockNK<1, NR>(xm, w, ym, K, N, n); break;
        case 2: BlockNK<2, NR>(xm, w, ym, K, N, n); break;
        default: BlockNK<3, NR>(xm, w, ym, K, N, n); break;
      }
    }
  return n;
}
#endif

void MatmulNK(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
#ifdef JAXINFER_AVX2
  n0 = VectorNK(x, w, y, M, K, N, n0, n1);
#endif
  if (n0 < n1) PlainNK(x, w, y, M, K, N, n0, n1);
}

// Where a [K, N] weight's two halves of K meet: the first half is summed from k = 0, the second
// from `KSplit(K)`, each from scratch, and y = first + second.
inline int64_t KSplit(int64_t K) { return (K / 2 + kChunk - 1) / kChunk * kChunk; }

// y_i = x @ W_i for every weight i of the call (q/k/v, or gate/up: one input, several outputs).
ffi::Error FloatMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets rets,
                           int64_t transpose, int64_t threads) {
  const auto xd = x.dimensions();
  const size_t count = rets.size();
  if (xd.size() != 2 || args.size() != count)
    return ffi::Error::InvalidArgument("float_matmul_cpu: x must be 2-D, with one weight per output");
  const int64_t M = xd[0], K = xd[1];
  std::vector<const float*> ws;
  std::vector<float*> ys;
  std::vector<int64_t> ns;
  int64_t bytes = 0;
  for (size_t i = 0; i < count; ++i) {
    auto w = args.get<ffi::Buffer<ffi::F32>>(i);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (w.has_error() || y.has_error())
      return ffi::Error::InvalidArgument("float_matmul_cpu: weights and outputs must be float32");
    const auto wd = w->dimensions(), yd = (*y)->dimensions();
    const int64_t N = transpose ? wd[0] : wd[1];
    if (wd.size() != 2 || yd.size() != 2 || yd[0] != M || yd[1] != N || (transpose ? wd[1] : wd[0]) != K)
      return ffi::Error::InvalidArgument("float_matmul_cpu: weight [K, N] ([N, K] transposed), output [M, N]");
    ws.push_back(w->typed_data());
    ys.push_back((*y)->typed_data());
    ns.push_back(N);
    bytes += 4 * K * N;
  }
  const float* xp = x.typed_data();
  const int64_t T = bytes < kThreadedBytes ? 1 : std::max<int64_t>(1, threads);
  if (transpose) {
    // each thread a contiguous range of W's rows (outputs), in blocks of 64
    int64_t total = 0;
    for (int64_t n : ns) total += n;
    const int64_t chunk = ((total + T - 1) / T + 63) / 64 * 64;
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      int64_t first = 0;
      for (size_t i = 0; i < count; ++i) {
        const int64_t a = std::max<int64_t>(0, t * chunk - first), b = std::min(ns[i], (t + 1) * chunk - first);
        if (a < b) MatmulNK(xp, ws[i], ys[i], M, K, ns[i], a, b);
        first += ns[i];
      }
    }
    return ffi::Error::Success();
  }
  // [K, N]: the two halves of K, one per thread (each reads its half of every weight front to back;
  // two threads splitting the columns instead read 5-10 GB/s together, below one), the second half
  // into scratch, then y += scratch.
  const int64_t split = std::min(K, KSplit(K));
  std::vector<std::vector<float>> second(count);
  for (size_t i = 0; i < count; ++i) second[i].assign(M * ns[i], 0.0f);
  // more than 2 threads: each half's columns in C blocks of whole 64s (a column's sums are unchanged)
  const int64_t C = std::max<int64_t>(1, T / 2);
#pragma omp parallel for num_threads(std::min(T, 2 * C)) schedule(static)
  for (int64_t task = 0; task < 2 * C; ++task) {
    const int64_t half = task / C, c = task % C;
    for (size_t i = 0; i < count; ++i) {
      const int64_t per = (ns[i] / C + 63) / 64 * 64;
      const int64_t n0 = std::min(ns[i], c * per), n1 = c == C - 1 ? ns[i] : std::min(ns[i], (c + 1) * per);
      if (n0 >= n1) continue;
      if (half == 0) MatmulKN(xp, ws[i], ys[i], M, K, ns[i], 0, split, n0, n1, true);
      else if (split < K) MatmulKN(xp, ws[i], second[i].data(), M, K, ns[i], split, K, n0, n1, true);
    }
  }
  if (split < K)
    for (size_t i = 0; i < count; ++i)
      for (int64_t j = 0; j < M * ns[i]; ++j) ys[i][j] += second[i][j];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferFloatMatmul, FloatMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("transpose")
                                  .Attr<int64_t>("threads"));
