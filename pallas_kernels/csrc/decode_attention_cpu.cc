// Decode attention over paged K/V on the CPU (one query token per row): an XLA FFI custom call with
// the contract of `paged_attention_reference.decode_attention_by_pages`, which it replaces on CPU
// under the "auto" backend.
//
// Why: XLA:CPU runs the reference's gather + batched einsum + segment softmax at a fraction of the
// memory's speed: SmolLM2's 30 layers at 350 tokens of context took 4.2 ms for one row and 19.1 ms
// for eight (docs/BENCHMARKS.md, 2026-12-05), while the keys and values it reads take ~1 ms per row.
// A verify step (one request's 1 + k positions, each a row) paid that per row.
//
// Per row s (query position kv_lens[s] - 1), over the work items of its sequence in their order
// (each item: pages_per_item pages starting at token item_pos), per query head: the scores of the
// item's visible tokens (the G query heads of a KV head read its keys while they are in L1), then an
// online softmax: running max, rescale once per item, exp-weighted sum of values. Tokens past the
// query's position (or outside the sliding window) are never read, so slots holding anything (NaN
// included) do not matter.
//
// A row's output depends only on its own query, its items and the cache: the same float operations
// in the same order whatever the other rows of the step or the threads (threads take whole rows), so
// a verify step's row equals bitwise a decode step of that position alone. A mixed step's prompt rows
// come here too, each a row (`ragged_rows_as_decodes`): many rows, so each row's span of items is
// found once per call and rows are dealt to the threads one by one.
//
// A draft tree's rows (speculative decoding, `jaxinfer.speculative.tree`) see only their ancestors
// among the step's rows: row s with tree_mask[s] != -1 sees positions before tree_base[s] and, of
// the 32 from there, those whose bit is set; its own position (for the sliding window) is
// tree_base + popcount(tree_mask) - 1. -1: every position up to its own, as above.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define JAXINFER_AVX2 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kHeads = 4;           // query heads (of one KV head) that share each key and value read
constexpr int64_t kMaxItemTokens = 1024;  // tokens per work item (pages_per_item * page_size)

struct Shapes {
  int64_t S, N, H, P, ps, K, G, I, per_item, layer_offset;
};

// exp(x) for x <= 0 (scores minus their running max; -inf and below -87 give 0): range reduction
// x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for exp(r) (Cephes' expf), 2^n in the exponent
// bits. The same operations in the vector and the scalar form, so every element gets the same value
// wherever it sits.
inline float ExpScalar(float x) {
  if (!(x >= -87.0f)) return 0.0f;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fmaf(n, -0.693359375f, x);
  r = std::fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fmaf(p, r, 1.3981999507e-3f);
  p = std::fmaf(p, r, 8.3334519073e-3f);
  p = std::fmaf(p, r, 4.1665795894e-2f);
  p = std::fmaf(p, r, 1.6666665459e-1f);
  p = std::fmaf(p, r, 5.0000001201e-1f);
  p = std::fmaf(p, r * r, r) + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}

#ifdef JAXINFER_AVX2
inline __m256 ExpVector(__m256 x) {
  const __m256 valid = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // (-inf: masked out below)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  p = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_and_ps(p, valid);
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// exp over n values in place (n a multiple of 8 on the vector path: callers pad with -inf).
inline void ExpAll(float* x, int64_t n) {
  int64_t t = 0;
#ifdef JAXINFER_AVX2
  for (; t + 8 <= n; t += 8) _mm256_storeu_ps(x + t, ExpVector(_mm256_loadu_ps(x + t)));
#endif
  for (; t < n; ++t) x[t] = ExpScalar(x[t]);
}

// scores[g * stride + t] = q_g . key_t for GH query heads (q: GH rows of H) and the n keys at `slot`.
template <int GH>
void Scores(const float* q, const float* kc, const int64_t* slot, int64_t n, int64_t H, float* scores,
            int64_t stride) {
#ifdef JAXINFER_AVX2
  if (H % 8 == 0) {
    for (int64_t t = 0; t < n; ++t) {
      const float* k = kc + slot[t];
      __m256 acc[GH];
      for (int g = 0; g < GH; ++g) acc[g] = _mm256_setzero_ps();
      for (int64_t h = 0; h < H; h += 8) {
        const __m256 kv = _mm256_loadu_ps(k + h);
        for (int g = 0; g < GH; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * H + h), kv, acc[g]);
      }
      for (int g = 0; g < GH; ++g) scores[g * stride + t] = HorizontalSum(acc[g]);
    }
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t) {
    const float* k = kc + slot[t];
    for (int g = 0; g < GH; ++g) {
      float s = 0.0f;
      for (int64_t h = 0; h < H; ++h) s = std::fmaf(q[g * H + h], k[h], s);
      scores[g * stride + t] = s;
    }
  }
}

// acc[g] = acc[g] * rescale[g] + sum_t p[g * stride + t] * value_t for GH heads.
template <int GH>
void Accumulate(float* acc, const float* rescale, const float* p, int64_t stride, const float* vc,
                const int64_t* slot, int64_t n, int64_t H) {
  int64_t h = 0;
#ifdef JAXINFER_AVX2
  for (; h + 16 <= H; h += 16) {
    __m256 a[GH][2];
    for (int g = 0; g < GH; ++g) {
      const __m256 r = _mm256_set1_ps(rescale[g]);
      a[g][0] = _mm256_mul_ps(_mm256_loadu_ps(acc + g * H + h), r);
      a[g][1] = _mm256_mul_ps(_mm256_loadu_ps(acc + g * H + h + 8), r);
    }
    for (int64_t t = 0; t < n; ++t) {
      const float* v = vc + slot[t] + h;
      const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
      for (int g = 0; g < GH; ++g) {
        const __m256 w = _mm256_set1_ps(p[g * stride + t]);
        a[g][0] = _mm256_fmadd_ps(w, v0, a[g][0]);
        a[g][1] = _mm256_fmadd_ps(w, v1, a[g][1]);
      }
    }
    for (int g = 0; g < GH; ++g) {
      _mm256_storeu_ps(acc + g * H + h, a[g][0]);
      _mm256_storeu_ps(acc + g * H + h + 8, a[g][1]);
    }
  }
#endif
  for (; h < H; ++h)
    for (int g = 0; g < GH; ++g) {
      float a = acc[g * H + h] * rescale[g];
      for (int64_t t = 0; t < n; ++t) a = std::fmaf(p[g * stride + t], vc[slot[t] + h], a);
      acc[g * H + h] = a;
    }
}

// One item's visible tokens (n, at `slot`: offsets of KV head 0's vectors) for GH query heads q [GH, H]
// of the KV head whose keys and values start at kc, vc: the online softmax's state m, l [GH] and the
// unnormalised output out [GH, H] move on by these tokens.
template <int GH>
void HeadBlock(const float* q, const float* kc, const float* vc, const int64_t* slot, int64_t n, int64_t H,
               float sm_scale, float soft_cap, float* m, float* l, float* out) {
  constexpr int64_t stride = kMaxItemTokens;
  thread_local std::vector<float> scores(kHeads * kMaxItemTokens);
  float rescale[GH];
  const int64_t padded = (n + 7) / 8 * 8;
  float* sc = scores.data();
  Scores<GH>(q, kc, slot, n, H, sc, stride);
  for (int g = 0; g < GH; ++g) {
    float* s = sc + g * stride;
    float mx = m[g];
    for (int64_t t = 0; t < n; ++t) {
      float x = s[t] * sm_scale;
      if (soft_cap > 0.0f) x = soft_cap * std::tanh(x / soft_cap);
      s[t] = x;
      mx = std::max(mx, x);
    }
    for (int64_t t = 0; t < n; ++t) s[t] -= mx;
    for (int64_t t = n; t < padded; ++t) s[t] = -std::numeric_limits<float>::infinity();
    ExpAll(s, padded);
    float sum = 0.0f;
    for (int64_t t = 0; t < n; ++t) sum += s[t];
    rescale[g] = ExpScalar(m[g] - mx);  // (0 on the first item: m = -inf)
    l[g] = l[g] * rescale[g] + sum;
    m[g] = mx;
  }
  Accumulate<GH>(out, rescale, sc, stride, vc, slot, n, H);
}

// One row: out [N, H] for the query q [N, H] at position qpos of sequence `seq`. Items outermost, so
// an item's keys and values come from memory once and stay in L1 / L2 for every head.
void Row(const Shapes& d, const float* q, const float* kc, const float* vc, const int32_t* item_seq,
         const int32_t* item_pages, const int32_t* item_pos, int64_t seq, int64_t qpos, int32_t tree_base,
         int32_t tree_mask, int64_t window, int64_t item_begin, int64_t item_end, float sm_scale, float soft_cap,
         float* out) {
  const int64_t N = d.N, H = d.H, ps = d.ps, group = d.per_item / ps;
  const int64_t token_stride = d.K * H, page_stride = ps * d.K * H;
  std::fill(out, out + N * H, 0.0f);
  if (qpos < 0) return;
  const bool tree = tree_mask != -1;
  const uint32_t bits = static_cast<uint32_t>(tree_mask);
  const int64_t own = tree ? int64_t{tree_base} + __builtin_popcount(bits) - 1 : qpos;  // (its RoPE position)
  const int64_t lo = window > 0 ? own - window + 1 : 0;  // the first visible position
  thread_local std::vector<int64_t> slot(kMaxItemTokens);
  thread_local std::vector<float> m, l;
  m.assign(N, -std::numeric_limits<float>::infinity());
  l.assign(N, 0.0f);
  for (int64_t i = item_begin; i < item_end; ++i) {  // (the span of this row's items; others skipped)
    if (item_seq[i] != seq) continue;
    const int64_t first = item_pos[i];
    if (first > qpos || first + d.per_item <= lo) continue;
    int64_t n = 0;  // visible tokens of this item, in position order
    for (int64_t j = 0; j < group; ++j) {
      const int64_t page = item_pages[i * group + j];
      if (page < 0 || page >= d.P) continue;  // (a caller's bug; nothing outside the cache is read)
      for (int64_t t = 0; t < ps; ++t) {
        const int64_t pos = first + j * ps + t;
        if (pos < lo || pos > qpos) continue;
        if (tree && pos >= tree_base && (pos - tree_base >= 32 || !((bits >> (pos - tree_base)) & 1u))) continue;
        slot[n++] = d.layer_offset + page * page_stride + t * token_stride;
      }
    }
    if (n == 0) continue;
    for (int64_t kh = 0; kh < d.K; ++kh)
      for (int64_t g0 = 0; g0 < d.G; g0 += kHeads) {
        const int64_t head = kh * d.G + g0;
        const auto run = [&](auto block) {
          HeadBlock<decltype(block)::value>(q + head * H, kc + kh * H, vc + kh * H, slot.data(), n, H, sm_scale,
                                            soft_cap, m.data() + head, l.data() + head, out + head * H);
        };
        switch (std::min<int64_t>(kHeads, d.G - g0)) {
          case 1: run(std::integral_constant<int, 1>()); break;
          case 2: run(std::integral_constant<int, 2>()); break;
          case 3: run(std::integral_constant<int, 3>()); break;
          default: run(std::integral_constant<int, 4>()); break;
        }
      }
  }
  for (int64_t head = 0; head < N; ++head)
    if (l[head] > 0.0f) {
      const float inv = 1.0f / l[head];
      for (int64_t h = 0; h < H; ++h) out[head * H + h] *= inv;
    }
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                               ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> window, ffi::Buffer<ffi::S32> kv_lens,
                               ffi::Buffer<ffi::S32> item_seq, ffi::Buffer<ffi::S32> item_pages,
                               ffi::Buffer<ffi::S32> item_pos, ffi::Buffer<ffi::S32> tree_base,
                               ffi::Buffer<ffi::S32> tree_mask, ffi::ResultBuffer<ffi::F32> out, float sm_scale,
                               float soft_cap, int64_t threads) {
  const auto qd = q.dimensions(), kd = k_cache.dimensions(), id = item_pages.dimensions();
  bool same = kd.size() == v_cache.dimensions().size();
  for (size_t i = 0; same && i < kd.size(); ++i) same = kd[i] == v_cache.dimensions()[i];
  if (qd.size() != 3 || (kd.size() != 4 && kd.size() != 5) || id.size() != 2 || !same)
    return ffi::Error::InvalidArgument(
        "decode_attention_cpu: q [S, N, H], caches [(L,) P, page_size, K, H], item_pages [I, pages_per_item]");
  Shapes d;
  d.S = qd[0], d.N = qd[1], d.H = qd[2];
  const size_t o = kd.size() - 4;
  d.P = kd[o], d.ps = kd[o + 1], d.K = kd[o + 2];
  d.I = id[0];
  d.per_item = id[1] * d.ps;
  if (kd[o + 3] != d.H || d.N % d.K != 0 || kv_lens.element_count() != d.S || item_seq.element_count() != d.I ||
      item_pos.element_count() != d.I || tree_base.element_count() != d.S || tree_mask.element_count() != d.S)
    return ffi::Error::InvalidArgument("decode_attention_cpu: inconsistent shapes");
  if (d.per_item > kMaxItemTokens)
    return ffi::Error::InvalidArgument("decode_attention_cpu: more than 1024 tokens per work item");
  d.G = d.N / d.K;
  const int64_t L = kd.size() == 5 ? kd[0] : 1;
  const int64_t l = kd.size() == 5 ? layer.typed_data()[0] : 0;
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("decode_attention_cpu: layer out of range");
  d.layer_offset = l * d.P * d.ps * d.K * d.H;
  const int64_t w = window.typed_data()[0];
  const int32_t* lens = kv_lens.typed_data();
  // Each row's items lie between the first and the last item naming it: one pass finds the spans, so
  // a step of many rows (a prefill chunk's, one row per token) does not scan every item per row.
  const int32_t* seqs = item_seq.typed_data();
  std::vector<int64_t> begin(d.S, d.I), end(d.S, 0);
  for (int64_t i = 0; i < d.I; ++i)
    if (seqs[i] >= 0 && seqs[i] < d.S) {
      begin[seqs[i]] = std::min(begin[seqs[i]], i);
      end[seqs[i]] = i + 1;
    }
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(threads, d.S));
  // Rows dealt out one by one: a prefill chunk's later rows read more keys than its first.
#pragma omp parallel for num_threads(T) schedule(static, 1)
  for (int64_t s = 0; s < d.S; ++s)
    Row(d, q.typed_data() + s * d.N * d.H, k_cache.typed_data(), v_cache.typed_data(), seqs,
        item_pages.typed_data(), item_pos.typed_data(), s, int64_t{lens[s]} - 1, tree_base.typed_data()[s],
        tree_mask.typed_data()[s], w, begin[s], end[s], sm_scale,
        soft_cap, out->typed_data() + s * d.N * d.H);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [S, N, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_cache [(L,) P, page_size, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer []
                                  .Arg<ffi::Buffer<ffi::S32>>()   // sliding window [] (0: none)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_lens [S]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // item_seq [I]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // item_pages [I, pages_per_item]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // item_pos [I]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // tree_base [S]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // tree_mask [S] (-1: causal)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [S, N, H]
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")        // 0: none
                                  .Attr<int64_t>("threads"));
