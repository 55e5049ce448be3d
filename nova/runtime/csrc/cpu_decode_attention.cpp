// Paged decode attention for the CPU: one new query token per sequence, keys and values read
// in place from the paged KV cache (no gathered copy of the context).
//
// Why (docs/cpu.md, "Decode attention in place"): the eager path gathers every sequence's keys
// and values into a contiguous buffer with index_select, then runs two bmm's and a softmax
// over it: 19% of a 64-sequence decode step of the peer model went to the gather alone. Here
// each (sequence, KV head) pair reads its keys once for the scores and its values once for the
// output, and the scores are computed 16 keys at a time with bf16 dot products where the CPU
// has them (AVX512-BF16), with one transposing reduction per 16 keys.
//
// Layout: q [B, H, D]; k_cache, v_cache [slots, KVH, D] (slot = block * block_size + offset);
// block_tables [B, max_blocks] int32; seq_lens [B] int32. Query head h uses KV head h / G with
// G = H / KVH (as in transformers). Scores and softmax in fp32; output in q's dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using nova_cpu::exp_minus_max;
using nova_cpu::to_f32;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define NOVA_AVX512_BF16 1
// Lane i of the result: the sum of v[i]'s 16 lanes (a transposing reduction: 45 instructions
// for 16 sums instead of one horizontal reduction each).
inline __m512 sum_lanes_16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
    w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                         _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k)  // per 128-bit lane: one partial sum of each of 4 vectors
    x[k] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int k = 0; k < 2; ++k)  // across 128-bit lanes
    y[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88),
                       _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

// scores[g][t] = scale * q_g . k_t for bf16 rows of kD (a multiple of 32) elements, 16 keys at a
// time: bf16 pairs multiplied and summed into fp32 lanes (vdpbf16ps), then one transposing
// reduction per 16 keys.
template <int kD>
void bf16_scores(const c10::BFloat16* q, const c10::BFloat16* const* rows, int64_t len,
                 int64_t G, float scale, float* scores) {
  static_assert(kD % 32 == 0, "bf16_scores needs head_dim % 32 == 0");
  constexpr int kChunks = kD / 32;
  __m512bh qv[kChunks];
  __m512 part[16];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t g = 0; g < G; ++g) {
    for (int c = 0; c < kChunks; ++c)
      qv[c] = (__m512bh)_mm512_loadu_si512(q + g * kD + 32 * c);
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
      const int64_t n = std::min<int64_t>(16, len - t0);
      for (int64_t i = 0; i < 16; ++i) {
        __m512 a = _mm512_setzero_ps();
        if (i < n) {
          const c10::BFloat16* r = rows[t0 + i];
          for (int c = 0; c < kChunks; ++c)
            a = _mm512_dpbf16_ps(a, qv[c], (__m512bh)_mm512_loadu_si512(r + 32 * c));
        }
        part[i] = a;
      }
      const __m512 sums = _mm512_mul_ps(sum_lanes_16(part), vscale);
      float* dst = scores + g * len + t0;
      if (n == 16)
        _mm512_storeu_ps(dst, sums);
      else
        _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << n) - 1u), sums);
    }
  }
}

// out_g = sum_t p[g][t] v_t for NG (<= 4) query rows g of one KV head, kD a multiple of 16:
// the NG x kD/16 accumulators stay in registers while the value rows stream past (each row
// widened from bf16 to fp32 once and used by every row g); the outputs rounded to bf16.
template <int kD, int NG>
void bf16_values(const c10::BFloat16* const* rows, int64_t len, const float* probs,
                 int64_t probs_stride, c10::BFloat16* out) {
  static_assert(kD % 16 == 0, "bf16_values needs head_dim % 16 == 0");
  constexpr int kC = kD / 16;
  __m512 acc[NG][kC];
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < kC; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    __m512 v[kC];
    for (int c = 0; c < kC; ++c) v[c] = nova_cpu::load_bf16x16(rows[t] + 16 * c);
    for (int g = 0; g < NG; ++g) {
      const __m512 p = _mm512_set1_ps(probs[g * probs_stride + t]);
      for (int c = 0; c < kC; ++c) acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < kC; ++c)  // round to nearest even, as c10::BFloat16's conversion
      nova_cpu::store_bf16x16(out + g * kD + 16 * c, acc[g][c]);
}

// bf16_values for any number of query rows G, four at a time.
template <int kD>
void bf16_values_rows(const c10::BFloat16* const* rows, int64_t len, const float* probs,
                      int64_t G, c10::BFloat16* out) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) bf16_values<kD, 4>(rows, len, probs + g * len, len, out + g * kD);
  const int64_t rest = G - g;
  const float* pr = probs + g * len;
  c10::BFloat16* o = out + g * kD;
  if (rest == 3) bf16_values<kD, 3>(rows, len, pr, len, o);
  if (rest == 2) bf16_values<kD, 2>(rows, len, pr, len, o);
  if (rest == 1) bf16_values<kD, 1>(rows, len, pr, len, o);
}
#endif

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64)
    __builtin_prefetch(p + off, 0, 1);
}

// One (sequence, KV head) pair: its G query rows against its context, read block by block.
// kD > 0: head_dim known at compile time (the loops over it unroll and vectorize fully).
template <typename T, int kD>
void attend_item(const T* qp, const T* kp, const T* vp, const int32_t* table, int64_t len,
                 int64_t block_size, int64_t slot_stride, int64_t h, int64_t G, int64_t rt_D,
                 float scale, T* op, float* qf, float* row, float* acc,
                 std::vector<float>& scores, std::vector<const T*>& rows) {
  const int64_t D = kD > 0 ? kD : rt_D;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f32(qp[g * D + d]) * scale;
  scores.resize(G * len);
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  // (the rows of one head are small pieces strided through the cache: the hardware prefetcher
  // does not run ahead of them, so each block asks for the rows, keys and values, of the block
  // two ahead)
  auto prefetch_block = [&](int64_t blk) {
    if (blk >= num_blocks) return;
    const int64_t base = static_cast<int64_t>(table[blk]) * block_size;
    const int64_t n = std::min(block_size, len - blk * block_size);
    for (int64_t o = 0; o < n; ++o) {
      prefetch_row(kp + (base + o) * slot_stride + h * D, D);
      prefetch_row(vp + (base + o) * slot_stride + h * D, D);
    }
  };
  // fn(t, row) for each context position t in order, row: this head's row in ``cache``;
  // ``ahead``: at each block's start, prefetch the rows of the block two ahead
  auto each_row = [&](const T* cache, bool ahead, auto&& fn) {
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
      if (ahead) prefetch_block(blk + 2);
      const int64_t base = static_cast<int64_t>(table[blk]) * block_size;
      const int64_t n = std::min(block_size, len - blk * block_size);
      for (int64_t o = 0; o < n; ++o)
        fn(blk * block_size + o, cache + (base + o) * slot_stride + h * D);
    }
  };
  prefetch_block(0);
  prefetch_block(1);
#ifdef NOVA_AVX512_BF16
  constexpr bool kBf16Path = std::is_same_v<T, c10::BFloat16> && kD > 0 && kD % 32 == 0;
  if constexpr (kBf16Path) {
    rows.resize(len);
    each_row(kp, true, [&](int64_t t, const T* k) { rows[t] = k; });
    bf16_scores<kD>(qp, rows.data(), len, G, scale, scores.data());
  } else
#endif
  each_row(kp, true, [&](int64_t t, const T* k) {  // scores[g][t] = q_g . k_t
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) row[d] = to_f32(k[d]);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[d] * row[d];
      scores[g * len + t] = s;
    }
  });
  for (int64_t g = 0; g < G; ++g) {  // softmax per query row
    float* s = scores.data() + g * len;
    const float inv = 1.0f / exp_minus_max(s, len);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
#ifdef NOVA_AVX512_BF16
  if constexpr (kBf16Path) {
    each_row(vp, false, [&](int64_t t, const T* v) { rows[t] = v; });
    bf16_values_rows<kD>(rows.data(), len, scores.data(), G, op);
    return;
  }
#endif
  std::fill(acc, acc + G * D, 0.0f);
  each_row(vp, false, [&](int64_t t, const T* v) {  // out_g = sum_t p[g][t] v_t
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) row[d] = to_f32(v[d]);
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * len + t];
      float* a = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * row[d];
    }
  });
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) op[g * D + d] = static_cast<T>(acc[g * D + d]);
}

template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, int64_t block_size, double scale,
                           at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(1);
  const int64_t G = H / KVH;
  const int64_t max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  const int64_t slot_stride = KVH * D;  // elements between consecutive slots
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), row(D), acc(G * D), scores;
    std::vector<const T*> rows;  // (the AVX-512 bf16 path's row pointers, reused per item)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH, h = item % KVH;
      const int64_t len = lens[b];
      T* o = op + (b * H + h * G) * D;
      if (len <= 0) {  // no context: a zero output (the engine never asks for it)
        for (int64_t i = 0; i < G * D; ++i) o[i] = static_cast<T>(0.0f);
        continue;
      }
      const T* qrows = qp + (b * H + h * G) * D;
      const int32_t* table = bt + b * max_blocks;
      auto run = [&](auto d_tag) {
        attend_item<T, decltype(d_tag)::value>(qrows, kp, vp, table, len, block_size,
                                               slot_stride, h, G, D, fscale, o, qf.data(),
                                               row.data(), acc.data(), scores, rows);
      };
      if (D == 64)
        run(std::integral_constant<int, 64>{});
      else if (D == 128)
        run(std::integral_constant<int, 128>{});
      else
        run(std::integral_constant<int, 0>{});
    }
  });
}

}  // namespace

namespace nova_cpu {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3, "q must be [B, H, D]");
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.dim() == 3, "caches must be [slots, KVH, D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "q and the caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
                  q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must have one dtype");
  TORCH_CHECK(k_cache.size(2) == q.size(2) && v_cache.size(2) == q.size(2), "head_dim differs");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_tables and seq_lens must be int32");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous(),
              "block_tables and seq_lens must be contiguous");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && seq_lens.size(0) == q.size(0),
              "one block table and one length per sequence");
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  auto out = at::empty_like(q);
  nova_cpu::dispatch(q.scalar_type(), "decode_attention", [&](auto tag) {
    decode_attention_impl<decltype(tag)>(q, k_cache, v_cache, block_tables, seq_lens,
                                         block_size, scale, out);
  });
  return out;
}

}  // namespace nova_cpu
