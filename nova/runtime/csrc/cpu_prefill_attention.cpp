// Causal prefill attention over the paged KV cache in bf16, on AMX tiles (Intel AMX-BF16):
// each new token's query attends its sequence's keys 0..(cached + its index), read in place
// through the block table. nova/runtime/attention_cpu.py (``prefill="amx"``) calls it.
//
// One work item is (sequence, KV head, chunk of query rows); the rows of a KV head are its G
// query heads of every new token, row r = token (r / G), head (r % G), so one key and value
// tile serves all G heads. Per item:
//  1. the keys and values the chunk's last row sees are packed once into the tile layout
//     tdpbf16ps reads (pairs of bf16 along the reduced dimension), zero padded;
//  2. per block of 16 rows: scores S = Q K^T in 16 x 16 fp32 tiles, only over the key blocks
//     the block's last row sees; a softmax per row over its own causal prefix (fp32; the
//     probabilities rounded to bf16 for the product, as PyTorch's flash kernel does, and the
//     sum taken in fp32); O = P V in 16 x 16 fp32 tiles; each row divided by its sum and
//     rounded to bf16 once.
//
// The tile arithmetic has two implementations with one contract: ``AmxTiles`` (the hardware's
// tdpbf16ps) and ``RefTiles`` (the same products and fp32 sums in plain C++). The reference
// runs on any CPU, so tests check the packing, masking and softmax everywhere; the engine
// uses the kernel only where AMX is usable (``prefill_attention_amx``).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define NOVA_HAVE_AMX 1
#endif

#include "cpu_math.h"

namespace nova_cpu {
namespace {

constexpr int64_t kRows = 16;   // query rows per tile
constexpr int64_t kKeys = 16;   // keys per score tile
constexpr int64_t kStep = 32;   // bf16 elements along a tile row (64 bytes): one dp step
constexpr int64_t kChunkRows = 512;  // query rows per work item (at most)

using bf16 = uint16_t;

inline float bf16_to_f32(bf16 x) { return std::bit_cast<float>(uint32_t(x) << 16); }

// Packed keys: for key block j (16 keys) and dim step s (32 dims), a 16 x 32 tile whose row p
// holds dims (32s + 2p, 32s + 2p + 1) of the block's 16 keys, interleaved:
//   kpack[((j * S + s) * 16 + p) * 32 + 2n + e] = K[16j + n][32s + 2p + e]
// Packed values: for key step c (32 keys) and dim block nb (16 dims), row p holds keys
// (32c + 2p, 32c + 2p + 1) of the block's 16 dims, interleaved:
//   vpack[((c * NB + nb) * 16 + p) * 32 + 2n + e] = V[32c + 2p + e][16nb + n]

struct RefTiles {
  static void begin() {}
  static void end() {}
  // c[m][16j + n] = sum_d a[m][d] * K[16j + n][d] for key blocks j < blocks (fp32 sums of
  // bf16 products); a: 16 rows of D, row-major; c: row stride ldc floats.
  static void scores(const bf16* a, const bf16* kpack, int64_t D, int64_t blocks, float* c,
                     int64_t ldc) {
    const int64_t S = D / kStep;
    for (int64_t j = 0; j < blocks; ++j) {
      for (int64_t m = 0; m < kRows; ++m) {
        float acc[kKeys] = {};
        for (int64_t s = 0; s < S; ++s) {
          const bf16* tile = kpack + (j * S + s) * kRows * kStep;
          for (int64_t p = 0; p < kStep / 2; ++p) {
            const float a0 = bf16_to_f32(a[m * D + s * kStep + 2 * p]);
            const float a1 = bf16_to_f32(a[m * D + s * kStep + 2 * p + 1]);
            for (int64_t n = 0; n < kKeys; ++n) {
              acc[n] += a0 * bf16_to_f32(tile[p * kStep + 2 * n]) +
                        a1 * bf16_to_f32(tile[p * kStep + 2 * n + 1]);
            }
          }
        }
        for (int64_t n = 0; n < kKeys; ++n) c[m * ldc + j * kKeys + n] = acc[n];
      }
    }
  }
  // o[m][d] = sum_k p[m][k] * V[k][d] over key steps c < steps (32 keys each); p: row stride
  // ldp; o: 16 rows of D floats.
  static void values(const bf16* p, int64_t ldp, const bf16* vpack, int64_t D, int64_t steps,
                     float* o) {
    const int64_t NB = D / kKeys;
    std::fill(o, o + kRows * D, 0.0f);
    for (int64_t c = 0; c < steps; ++c) {
      for (int64_t nb = 0; nb < NB; ++nb) {
        const bf16* tile = vpack + (c * NB + nb) * kRows * kStep;
        for (int64_t m = 0; m < kRows; ++m) {
          for (int64_t q = 0; q < kStep / 2; ++q) {
            const float p0 = bf16_to_f32(p[m * ldp + c * kStep + 2 * q]);
            const float p1 = bf16_to_f32(p[m * ldp + c * kStep + 2 * q + 1]);
            for (int64_t n = 0; n < kKeys; ++n) {
              o[m * D + nb * kKeys + n] += p0 * bf16_to_f32(tile[q * kStep + 2 * n]) +
                                           p1 * bf16_to_f32(tile[q * kStep + 2 * n + 1]);
            }
          }
        }
      }
    }
  }
};

#ifdef NOVA_HAVE_AMX
// Every tile register is 16 rows x 64 bytes: tmm0-3 accumulate (fp32), tmm4 and tmm6 hold the
// left operand, tmm5 and tmm7 the right one.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

struct AmxTiles {
  static void begin() {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = kRows;
    }
    _tile_loadconfig(&cfg);
  }
  static void end() { _tile_release(); }

  static void scores(const bf16* a, const bf16* kpack, int64_t D, int64_t blocks, float* c,
                     int64_t ldc) {
    const int64_t S = D / kStep;
    const int64_t tile = kRows * kStep;
    const int64_t a_stride = D * sizeof(bf16), c_stride = ldc * sizeof(float);
    int64_t j = 0;
    // two key blocks at a time: each loaded query step serves both
    for (; j + 2 <= blocks; j += 2) {
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t s = 0; s < S; ++s) {
        _tile_loadd(4, a + s * kStep, a_stride);
        _tile_loadd(5, kpack + (j * S + s) * tile, 64);
        _tile_loadd(7, kpack + ((j + 1) * S + s) * tile, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 7);
      }
      _tile_stored(0, c + j * kKeys, c_stride);
      _tile_stored(1, c + (j + 1) * kKeys, c_stride);
    }
    if (j < blocks) {
      _tile_zero(0);
      for (int64_t s = 0; s < S; ++s) {
        _tile_loadd(4, a + s * kStep, a_stride);
        _tile_loadd(5, kpack + (j * S + s) * tile, 64);
        _tile_dpbf16ps(0, 4, 5);
      }
      _tile_stored(0, c + j * kKeys, c_stride);
    }
  }

  static void values(const bf16* p, int64_t ldp, const bf16* vpack, int64_t D, int64_t steps,
                     float* o) {
    const int64_t NB = D / kKeys;
    const int64_t tile = kRows * kStep;
    const int64_t p_stride = ldp * sizeof(bf16), o_stride = D * sizeof(float);
    // four dim blocks (64 dims) per pass, one accumulator each
    for (int64_t nb0 = 0; nb0 < NB; nb0 += 4) {
      const int64_t n = std::min<int64_t>(4, NB - nb0);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t c = 0; c < steps; ++c) {
        _tile_loadd(4, p + c * kStep, p_stride);
        const bf16* v = vpack + (c * NB + nb0) * tile;
        _tile_loadd(5, v, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (n > 1) {
          _tile_loadd(7, v + tile, 64);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (n > 2) {
          _tile_loadd(5, v + 2 * tile, 64);
          _tile_dpbf16ps(2, 4, 5);
        }
        if (n > 3) {
          _tile_loadd(7, v + 3 * tile, 64);
          _tile_dpbf16ps(3, 4, 7);
        }
      }
      float* out = o + nb0 * kKeys;
      _tile_stored(0, out, o_stride);
      if (n > 1) _tile_stored(1, out + kKeys, o_stride);
      if (n > 2) _tile_stored(2, out + 2 * kKeys, o_stride);
      if (n > 3) _tile_stored(3, out + 3 * kKeys, o_stride);
    }
  }
};

// Linux hands a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM);
// without it the first tile instruction faults. Asked once; PyTorch's oneDNN asks the same.
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqPerm = 0x1023, kGetPerm = 0x1022, kXtileData = 18;
    if (syscall(SYS_arch_prctl, kReqPerm, kXtileData) != 0) return false;
    unsigned long bits = 0;
    if (syscall(SYS_arch_prctl, kGetPerm, &bits) != 0) return false;
    return (bits & (1ul << kXtileData)) != 0;
  }();
  return ok;
}
#endif

struct Geometry {
  int64_t H, KVH, G, D, block_size, max_blocks;
  float scale;
};

// Keys [0, nk) of (sequence table, kv head) packed for ``scores`` (zero padded to 16 keys)
// and values packed for ``values`` (zero padded to 32 keys). A pair of bf16 moves as one
// uint32: a key row's dims (2i, 2i + 1) are pair i of its column; two keys' values at one dim
// are one pair of the value tile.
void pack_kv(const bf16* kc, const bf16* vc, const int32_t* table, int64_t kh, int64_t nk,
             const Geometry& g, std::vector<uint32_t>& kpack, std::vector<uint32_t>& vpack) {
  const int64_t D = g.D, S = D / kStep, NB = D / kKeys, pairs = D / 2;
  const int64_t key_blocks = (nk + kKeys - 1) / kKeys, key_steps = (nk + kStep - 1) / kStep;
  const int64_t ktile = S * kRows * kKeys, vtile = NB * kRows * kKeys;  // uint32 per block
  kpack.resize(key_blocks * ktile);
  vpack.resize(key_steps * vtile);
  std::fill(kpack.end() - ktile, kpack.end(), 0u);  // the last blocks' padding
  std::fill(vpack.end() - vtile, vpack.end(), 0u);
  auto row = [&](const bf16* cache, int64_t k) {
    const int64_t slot = int64_t(table[k / g.block_size]) * g.block_size + k % g.block_size;
    return cache + (slot * g.KVH + kh) * D;
  };
  for (int64_t k = 0; k < nk; ++k) {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(row(kc, k));
    uint32_t* dst = kpack.data() + (k / kKeys) * ktile + k % kKeys;
    for (int64_t i = 0; i < pairs; ++i) dst[i * kKeys] = src[i];
  }
  for (int64_t k = 0; k < nk; k += 2) {
    const bf16* v0 = row(vc, k);
    const bf16* v1 = k + 1 < nk ? row(vc, k + 1) : nullptr;
    uint32_t* dst = vpack.data() + (k / kStep) * vtile + ((k % kStep) / 2) * kKeys;
    for (int64_t nb = 0; nb < NB; ++nb) {
      uint32_t* d = dst + nb * kRows * kKeys;
      const bf16* a = v0 + nb * kKeys;
      if (v1 != nullptr) {
        const bf16* b = v1 + nb * kKeys;
        for (int64_t n = 0; n < kKeys; ++n) d[n] = uint32_t(a[n]) | (uint32_t(b[n]) << 16);
      } else {
        for (int64_t n = 0; n < kKeys; ++n) d[n] = uint32_t(a[n]);
      }
    }
  }
}

// One row's causal softmax: p[k] = exp(scale * s[k] - max) for k < vis, in bf16, 0 up to
// ``width``; returns 1 / sum (fp32, over the unrounded exps). ``s`` holds at least vis scores
// rounded up to 16 (the score tiles), which it overwrites.
inline float softmax_row(float* s, int64_t vis, float scale, bf16* p, int64_t width) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const int64_t full = vis / 16, tail = vis % 16;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << tail) - 1u);
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 mx = neg_inf;
  for (int64_t i = 0; i < full; ++i) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + 16 * i), vscale);
    _mm512_storeu_ps(s + 16 * i, x);
    mx = _mm512_max_ps(mx, x);
  }
  if (tail) {
    const __m512 x = _mm512_mask_mul_ps(neg_inf, tail_mask, _mm512_loadu_ps(s + 16 * full), vscale);
    _mm512_storeu_ps(s + 16 * full, x);
    mx = _mm512_max_ps(mx, x);
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < full; ++i) {
    const __m512 e = exp_clamped16(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * i), m));
    sum = _mm512_add_ps(sum, e);
    store_bf16x16(p + 16 * i, e);
  }
  int64_t done = 16 * full;
  if (tail) {
    const __m512 e = _mm512_maskz_mov_ps(
        tail_mask, exp_clamped16(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * full), m)));
    sum = _mm512_add_ps(sum, e);
    store_bf16x16(p + 16 * full, e);
    done += 16;
  }
  std::fill(p + done, p + width, bf16(0));
  return 1.0f / _mm512_reduce_add_ps(sum);
#else
  for (int64_t k = 0; k < vis; ++k) s[k] *= scale;
  const float inv = 1.0f / exp_minus_max(s, vis);
  for (int64_t k = 0; k < vis; ++k) p[k] = Storage<c10::BFloat16>::store(s[k]);
  std::fill(p + vis, p + width, bf16(0));
  return inv;
#endif
}

template <typename Tiles>
void prefill_attention_impl(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, const at::Tensor& query_start,
                            const Geometry& g, at::Tensor& out) {
  const int64_t B = seq_lens.size(0);
  const bf16* qp = reinterpret_cast<const bf16*>(q.data_ptr<at::BFloat16>());
  const bf16* kc = reinterpret_cast<const bf16*>(k_cache.data_ptr<at::BFloat16>());
  const bf16* vc = reinterpret_cast<const bf16*>(v_cache.data_ptr<at::BFloat16>());
  bf16* op = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* qsl = query_start.data_ptr<int32_t>();
  const int64_t D = g.D, G = g.G;

  // work items: (sequence, chunk of at most kChunkRows query rows, kv head), in that order; each
  // thread takes a contiguous run of about equal cost (rows x keys seen: a late chunk of a
  // long prompt costs several early ones, so equal counts would load one thread with the late
  // chunks). Contiguous runs keep a sequence's KV heads on one thread, which reads the same
  // cache rows (all heads of a slot are adjacent) while they are still in its caches: handing
  // items out one at a time instead was 1.25x slower on the served benchmark's wave (scratch).
  struct Item {
    int64_t seq, kv_head, row0;
  };
  std::vector<Item> work;
  std::vector<int64_t> cost_before{0};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t qlen = qsl[b + 1] - qsl[b], ctx = int64_t(lens[b]) - qlen;
    for (int64_t r0 = 0; r0 < qlen * G; r0 += kChunkRows) {
      const int64_t r1 = std::min(qlen * G, r0 + kChunkRows);
      const int64_t cost = (r1 - r0) * (ctx + (r1 - 1) / G + 1);
      for (int64_t kh = 0; kh < g.KVH; ++kh) {
        work.push_back({b, kh, r0});
        cost_before.push_back(cost_before.back() + cost);
      }
    }
  }
  const int64_t items = static_cast<int64_t>(work.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  // run w: the items whose cost starts in [w, w + 1) x total / workers
  auto run_start = [&](int64_t w) {
    const int64_t target = cost_before.back() * w / workers;
    return static_cast<int64_t>(
        std::lower_bound(cost_before.begin(), cost_before.end() - 1, target) -
        cost_before.begin());
  };

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    std::vector<uint32_t> kpack, vpack;
    std::vector<bf16> probs;
    std::vector<bf16> qs(kRows * D);
    std::vector<float> scores, acc(kRows * D);
    float inv_sum[kRows];
    Tiles::begin();
    for (int64_t it = run_start(w0), last = run_start(w1); it < last; ++it) {
      const int64_t b = work[it].seq, kh = work[it].kv_head, r0 = work[it].row0;
      const int64_t t0 = qsl[b], qlen = qsl[b + 1] - qsl[b];
      const int64_t ctx = int64_t(lens[b]) - qlen;  // cached keys before the new ones
      const int64_t r1 = std::min(qlen * G, r0 + kChunkRows);
      const int64_t nk = ctx + (r1 - 1) / G + 1;  // keys the chunk's last row sees
      pack_kv(kc, vc, bt + b * g.max_blocks, kh, nk, g, kpack, vpack);
      const int64_t ld = (nk + kStep - 1) / kStep * kStep;  // score / probability row stride
      scores.resize(kRows * ld);
      probs.resize(kRows * ld);
      for (int64_t rb = r0; rb < r1; rb += kRows) {
        const int64_t rows = std::min(kRows, r1 - rb);
        for (int64_t m = 0; m < kRows; ++m) {
          bf16* dst = qs.data() + m * D;
          if (m < rows) {
            const int64_t r = rb + m;
            std::memcpy(dst, qp + ((t0 + r / G) * g.H + kh * G + r % G) * D, D * sizeof(bf16));
          } else {
            std::memset(dst, 0, D * sizeof(bf16));
          }
        }
        const int64_t seen = ctx + (rb + rows - 1) / G + 1;  // keys the block's last row sees
        Tiles::scores(qs.data(), reinterpret_cast<const bf16*>(kpack.data()), D, (seen + kKeys - 1) / kKeys, scores.data(),
                      ld);
        const int64_t steps = (seen + kStep - 1) / kStep;
        for (int64_t m = 0; m < kRows; ++m) {
          bf16* prow = probs.data() + m * ld;
          if (m >= rows) {
            std::memset(prow, 0, steps * kStep * sizeof(bf16));
            inv_sum[m] = 0.0f;
            continue;
          }
          const int64_t vis = ctx + (rb + m) / G + 1;
          inv_sum[m] = softmax_row(scores.data() + m * ld, vis, g.scale, prow, steps * kStep);
        }
        Tiles::values(probs.data(), ld, reinterpret_cast<const bf16*>(vpack.data()), D, steps,
                      acc.data());
        for (int64_t m = 0; m < rows; ++m) {
          const int64_t r = rb + m;
          bf16* o = op + ((t0 + r / G) * g.H + kh * G + r % G) * D;
          const float* a = acc.data() + m * D;
          const float s = inv_sum[m];
          for (int64_t d = 0; d < D; ++d) o[d] = Storage<c10::BFloat16>::store(a[d] * s);
        }
      }
    }
    Tiles::end();
  });
}

}  // namespace

bool prefill_attention_amx() {
#ifdef NOVA_HAVE_AMX
  return amx_permitted();
#else
  return false;
#endif
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, const at::Tensor& query_start,
                             int64_t block_size, double scale, bool reference) {
  TORCH_CHECK(q.dim() == 3, "q must be [T, H, D]");
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.dim() == 3, "caches must be [slots, KVH, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16,
              "prefill_attention: q and the caches must be bf16");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "q and the caches must be contiguous");
  const int64_t H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && v_cache.size(2) == D, "head_dim differs");
  TORCH_CHECK(D % kStep == 0, "prefill_attention: head_dim must be a multiple of 32, got ", D);
  TORCH_CHECK(H % KVH == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_start.scalar_type() == at::kInt,
              "block_tables, seq_lens and query_start must be int32");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous() &&
                  query_start.is_contiguous(),
              "block_tables, seq_lens and query_start must be contiguous");
  const int64_t B = seq_lens.size(0);
  TORCH_CHECK(block_tables.size(0) == B && query_start.size(0) == B + 1,
              "one block table and one length per sequence, B + 1 query offsets");
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* qsl = query_start.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[B] == q.size(0), "query offsets must span q's tokens");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t qlen = qsl[b + 1] - qsl[b];
    TORCH_CHECK(qlen >= 0 && qlen <= lens[b], "sequence ", b, ": ", qlen,
                " new tokens but a context of ", lens[b]);
    TORCH_CHECK((int64_t(lens[b]) + block_size - 1) / block_size <= block_tables.size(1),
                "sequence ", b, ": its context needs more blocks than its table holds");
  }
  Geometry g{H, KVH, H / KVH, D, block_size, block_tables.size(1), static_cast<float>(scale)};
  auto out = at::empty_like(q);
  if (reference) {
    prefill_attention_impl<RefTiles>(q, k_cache, v_cache, block_tables, seq_lens, query_start,
                                     g, out);
    return out;
  }
#ifdef NOVA_HAVE_AMX
  TORCH_CHECK(amx_permitted(), "prefill_attention: the OS did not grant the AMX tile state");
  prefill_attention_impl<AmxTiles>(q, k_cache, v_cache, block_tables, seq_lens, query_start, g,
                                   out);
  return out;
#else
  TORCH_CHECK(false, "prefill_attention: built without AMX (use reference=True)");
#endif
}

}  // namespace nova_cpu
