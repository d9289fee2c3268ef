// Native CPU prefill attention for PFA's float cases: a flash-attention kernel in AVX-512 (fp32 math).
//
// Exact semantics of the band PFA's sparse modes reduce to: query row i (< q_len) of a batch attends keys
// j in [i + lo_offset, i + hi_offset] clipped to [0, kv_len); rows with no key are 0. The rows past q_len are
// left to the caller. The kernel never materializes S1 x S2: per (batch, kv head) it converts K (transposed,
// in key blocks) and V to fp32 once, then every block of query positions walks only the key blocks its band
// touches, with an online softmax. The `group` query heads sharing a kv head are packed into one block of rows
// so GQA reads K/V once. Products and sums are fp32 (the reference's precision), softmax uses exp2 with the
// scale * log2(e) folded into Q, and the output is rounded once to the output dtype (round-to-nearest-even).
//
// Work is split by (batch, kv head) "units": with many units each thread takes whole units (its K/V copy stays
// in its L2); with few, all threads convert a group of units, then share its query blocks, heaviest first.
//
// Only the kernel section is compiled for AVX-512 (GCC target pragma); the binding checks the CPU at run time
// and Python routes elsewhere when it is missing, so the module loads on any x86-64.

#include "ops.h"

#include <ATen/Parallel.h>

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

namespace vllm_pfa {

enum class ElementType : int { kFloat32, kFloat16, kBFloat16 };

constexpr int kRowTile = 6;           // register tile rows
constexpr int kColVectors = 4;        // register tile width in 16-float vectors (64 columns)
constexpr int kKeyBlock = 256;        // keys per block (a multiple of 16; 256 measured best)
constexpr int kRowsPerQueryBlock = 96;  // packed (position, group head) rows per work item

struct Strides {
  int64_t batch, head, seq;  // elements; the head dimension is contiguous
};

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  Strides qs, ks, vs, os;
  ElementType type;
  int64_t heads, kv_heads, head_dim, padded_dim;
  float score_scale;  // scale_value * log2(e)
};

struct BatchBand {
  int64_t q_len, kv_len, lo_offset, hi_offset;
  int64_t row_lo(int64_t i) const { return std::max<int64_t>(0, i + lo_offset); }
  int64_t row_hi(int64_t i) const { return std::min<int64_t>(kv_len, i + hi_offset + 1); }
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace kernel {

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

inline __m512 load16(const void* p, ElementType type, __mmask16 m) {
  switch (type) {
    case ElementType::kFloat32:
      return _mm512_maskz_loadu_ps(m, p);
    case ElementType::kFloat16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
    default:
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
}

inline void store16(void* p, ElementType type, __m512 x, __mmask16 m) {
  switch (type) {
    case ElementType::kFloat32:
      _mm512_mask_storeu_ps(p, m, x);
      return;
    case ElementType::kFloat16:
      _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    default: {  // bf16, round to nearest even; NaN stays a quiet NaN
      __m512i bits = _mm512_castps_si512(x);
      __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
      _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(rounded));
    }
  }
}

inline void prefetch_row(const char* row, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(row + offset, _MM_HINT_T0);
}

inline int64_t element_bytes(ElementType type) { return type == ElementType::kFloat32 ? 4 : 2; }

inline const char* at_element(const void* base, ElementType type, int64_t offset) {
  return static_cast<const char*>(base) + offset * element_bytes(type);
}

// 2^x for x <= 0; exactly 0 below 2^-126 (and for -inf, the masked scores).
inline __m512 exp2_nonpositive(__m512 x) {
  __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(x, n);  // [-0.5, 0.5]: degree-7 Taylor of 2^f is within 1e-8 relative
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

// C[kRowTile x 16*NV] = (alpha ? diag(alpha) * C : 0) + A[kRowTile x depth] * B[depth x 16*NV], all fp32.
template <int NV>
inline void gemm_tile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t depth,
                      const float* alpha) {
  __m512 acc[kRowTile][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kRowTile; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = alpha ? _mm512_mul_ps(_mm512_loadu_ps(c + r * ldc + 16 * v), _mm512_set1_ps(alpha[r]))
                        : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < kRowTile; ++r) {
      __m512 av = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRowTile; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
  }
}

// A row tile times a [depth x width] matrix, width a multiple of 16.
inline void gemm_rows(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t depth,
                      int64_t width, const float* alpha) {
  int64_t col = 0;
  for (; col + 16 * kColVectors <= width; col += 16 * kColVectors) {
    gemm_tile<kColVectors>(a, lda, b + col, ldb, c + col, ldc, depth, alpha);
  }
  switch ((width - col) / 16) {
    case 3: gemm_tile<3>(a, lda, b + col, ldb, c + col, ldc, depth, alpha); break;
    case 2: gemm_tile<2>(a, lda, b + col, ldb, c + col, ldc, depth, alpha); break;
    case 1: gemm_tile<1>(a, lda, b + col, ldb, c + col, ldc, depth, alpha); break;
    default: break;
  }
}

// Keys [key_start, key_end) of one kv head into fp32: K transposed per key block ([block][dim][kKeyBlock]) and V
// row-major ([key][padded_dim]); keys past kv_len and dims past head_dim are 0 (finite, so masked products vanish).
void convert_keys(const Problem& p, int64_t batch, int64_t kv_head, int64_t kv_len, int64_t key_start, int64_t key_end,
                  float* key_t, float* value) {
  alignas(64) float rows[16 * 512];
  const int64_t dp = p.padded_dim;
  const __m512i gather_index = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                  _mm512_set1_epi32(static_cast<int>(dp)));
  for (int64_t tile = key_start; tile < key_end; tile += 16) {
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t key = tile + j;
      const bool live = key < kv_len;
      const char* krow = at_element(p.k, p.type, batch * p.ks.batch + kv_head * p.ks.head + key * p.ks.seq);
      const char* vrow = at_element(p.v, p.type, batch * p.vs.batch + kv_head * p.vs.head + key * p.vs.seq);
      for (int64_t d = 0; d < dp; d += 16) {
        const __mmask16 m = live ? tail_mask(p.head_dim - d) : __mmask16(0);
        _mm512_store_ps(rows + j * dp + d, load16(at_element(krow, p.type, d), p.type, m));
        _mm512_storeu_ps(value + key * dp + d, load16(at_element(vrow, p.type, d), p.type, m));
      }
    }
    float* kt = key_t + (tile / kKeyBlock) * dp * kKeyBlock + tile % kKeyBlock;
    for (int64_t d = 0; d < dp; ++d) {
      _mm512_storeu_ps(kt + d * kKeyBlock, _mm512_i32gather_ps(gather_index, rows + d, 4));
    }
  }
}

struct Scratch {
  float* q;       // [rows][padded_dim], scaled
  float* scores;  // [rows][kKeyBlock]
  float* acc;     // [rows][padded_dim]
  float* row_max;
  float* row_sum;
  float* alpha;
  int64_t* lo;       // [rows] first kept key
  int64_t* hi;       // [rows] one past the last kept key
  int64_t* tile_lo;  // [row tiles] block-relative column range of the current key block
  int64_t* tile_hi;
};

// One block of query positions [first, first + count) of one kv head, all group heads.
void attend_block(const Problem& p, const BatchBand& band, int64_t batch, int64_t kv_head, int64_t first,
                  int64_t count, const float* key_t, const float* value, const Scratch& s) {
  const int64_t group = p.heads / p.kv_heads;
  const int64_t dp = p.padded_dim;
  const int64_t rows = count * group;
  const int64_t padded_rows = (rows + kRowTile - 1) / kRowTile * kRowTile;
  const __m512 q_scale = _mm512_set1_ps(p.score_scale);
  int64_t union_lo = std::numeric_limits<int64_t>::max(), union_hi = 0;
  // Row r is position first + r / group of query head kv_head * group + r % group.
  auto query_row = [&](int64_t r) {
    return at_element(p.q, p.type,
                      batch * p.qs.batch + (kv_head * group + r % group) * p.qs.head + (first + r / group) * p.qs.seq);
  };
  // Query rows of one head sit a whole token apart (BSND), which the hardware prefetcher does not follow.
  constexpr int64_t kPrefetchAhead = 8;
  const int64_t row_bytes = p.head_dim * element_bytes(p.type);
  for (int64_t r = 0; r < rows && r < kPrefetchAhead; ++r) prefetch_row(query_row(r), row_bytes);
  for (int64_t r = 0; r < padded_rows; ++r) {
    const int64_t pos = first + r / group;
    if (r + kPrefetchAhead < rows) prefetch_row(query_row(r + kPrefetchAhead), row_bytes);
    int64_t lo = 0, hi = 0;
    if (r < rows) {
      lo = band.row_lo(pos);
      hi = band.row_hi(pos);
      const char* qrow = query_row(r);
      for (int64_t d = 0; d < dp; d += 16) {
        __m512 x = load16(at_element(qrow, p.type, d), p.type, tail_mask(p.head_dim - d));
        _mm512_storeu_ps(s.q + r * dp + d, _mm512_mul_ps(x, q_scale));
      }
    } else {
      for (int64_t d = 0; d < dp; d += 16) _mm512_storeu_ps(s.q + r * dp + d, _mm512_setzero_ps());
    }
    if (lo >= hi) lo = hi = 0;  // an empty row
    s.lo[r] = lo;
    s.hi[r] = hi;
    if (lo < hi) {
      union_lo = std::min(union_lo, lo);
      union_hi = std::max(union_hi, hi);
    }
    s.row_max[r] = -std::numeric_limits<float>::infinity();
    s.row_sum[r] = 0.0f;
    for (int64_t d = 0; d < dp; d += 16) _mm512_storeu_ps(s.acc + r * dp + d, _mm512_setzero_ps());
  }
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const int64_t tiles = padded_rows / kRowTile;
  for (int64_t block_start = union_hi ? union_lo / kKeyBlock * kKeyBlock : 0; block_start < union_hi;
       block_start += kKeyBlock) {
    const float* kt = key_t + (block_start / kKeyBlock) * dp * kKeyBlock;
    const float* vb = value + block_start * dp;
    // Columns of this block any row of a tile keeps: [col_lo, col_hi), block-relative; empty when lo >= hi.
    for (int64_t t = 0; t < tiles; ++t) {
      int64_t col_lo = kKeyBlock, col_hi = 0;
      for (int64_t r = t * kRowTile; r < (t + 1) * kRowTile; ++r) {
        const int64_t lo = std::max(s.lo[r] - block_start, int64_t(0));
        const int64_t hi = std::min(s.hi[r] - block_start, int64_t(kKeyBlock));
        if (lo < hi) {
          col_lo = std::min(col_lo, lo);
          col_hi = std::max(col_hi, hi);
        }
      }
      s.tile_lo[t] = col_lo;
      s.tile_hi[t] = col_hi;
    }
    // Scores, one 64-key panel of K at a time so the panel stays in L1 across all row tiles.
    for (int64_t panel = 0; panel < kKeyBlock; panel += 16 * kColVectors) {
      for (int64_t t = 0; t < tiles; ++t) {
        if (s.tile_lo[t] >= s.tile_hi[t]) continue;
        const int64_t lo = std::max(panel, s.tile_lo[t] / 16 * 16);
        const int64_t hi = std::min(panel + 16 * kColVectors, (s.tile_hi[t] + 15) / 16 * 16);
        if (lo < hi) {
          gemm_rows(s.q + t * kRowTile * dp, dp, kt + lo, kKeyBlock, s.scores + t * kRowTile * kKeyBlock + lo,
                    kKeyBlock, dp, hi - lo, nullptr);
        }
      }
    }
    // Online softmax: weights of the kept columns, 0 for the rest of the tile's column range.
    for (int64_t r = 0; r < padded_rows; ++r) {
      const int64_t t = r / kRowTile;
      if (s.tile_lo[t] >= s.tile_hi[t]) continue;
      const int64_t score_lo = s.tile_lo[t] / 16 * 16, score_hi = (s.tile_hi[t] + 15) / 16 * 16;
      float* row = s.scores + r * kKeyBlock;
      const int64_t lo = std::max(s.lo[r] - block_start, int64_t(0));
      const int64_t hi = std::min(s.hi[r] - block_start, int64_t(kKeyBlock));
      if (lo >= hi) {  // nothing kept in this block: zero weights, state unchanged
        for (int64_t c = score_lo; c < score_hi; c += 16) _mm512_storeu_ps(row + c, _mm512_setzero_ps());
        s.alpha[r] = 1.0f;
        continue;
      }
      __m512 vmax = neg_inf;
      for (int64_t c = lo; c < hi; c += 16) {
        vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(neg_inf, tail_mask(hi - c), row + c));
      }
      const float old_max = s.row_max[r];
      const float new_max = std::max(old_max, _mm512_reduce_max_ps(vmax));
      const __m512 shift = _mm512_set1_ps(new_max);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t c = score_lo; c < score_hi; c += 16) {
        const __m512i col = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(c)));
        const __mmask16 kept = _mm512_cmp_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(lo)), _MM_CMPINT_NLT) &
                               _mm512_cmp_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(hi)), _MM_CMPINT_LT);
        const __m512 e = _mm512_maskz_mov_ps(kept, exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + c), shift)));
        vsum = _mm512_add_ps(vsum, e);
        _mm512_storeu_ps(row + c, e);
      }
      s.alpha[r] = std::exp2(old_max - new_max);  // 0 when this is the row's first kept block
      s.row_sum[r] = s.row_sum[r] * s.alpha[r] + _mm512_reduce_add_ps(vsum);
      s.row_max[r] = new_max;
    }
    // acc = alpha * acc + P V, one 64-wide panel of V at a time (L1-resident across the row tiles).
    for (int64_t panel = 0; panel < dp; panel += 16 * kColVectors) {
      const int64_t width = std::min<int64_t>(16 * kColVectors, dp - panel);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t col_lo = s.tile_lo[t], col_hi = s.tile_hi[t];
        if (col_lo >= col_hi) continue;
        const int64_t r0 = t * kRowTile;
        gemm_rows(s.scores + r0 * kKeyBlock + col_lo, kKeyBlock, vb + col_lo * dp + panel, dp,
                  s.acc + r0 * dp + panel, dp, col_hi - col_lo, width, s.alpha + r0);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = first + r / group;
    const int64_t head = kv_head * group + r % group;
    const char* orow = at_element(p.out, p.type, batch * p.os.batch + head * p.os.head + pos * p.os.seq);
    const __m512 inv = _mm512_set1_ps(s.row_sum[r] > 0.0f ? 1.0f / s.row_sum[r] : 0.0f);
    for (int64_t d = 0; d < p.head_dim; d += 16) {
      store16(const_cast<char*>(at_element(orow, p.type, d)), p.type,
              _mm512_mul_ps(_mm512_loadu_ps(s.acc + r * dp + d), inv), tail_mask(p.head_dim - d));
    }
  }
}

}  // namespace kernel

#pragma GCC pop_options

namespace {

struct AlignedFree {
  void operator()(float* ptr) const { std::free(ptr); }
};
using Buffer = std::unique_ptr<float[], AlignedFree>;

Buffer allocate(int64_t floats) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(floats, 16)) * sizeof(float) + 63) / 64 * 64;
  auto* ptr = static_cast<float*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(ptr != nullptr, "vllm_pfa native kernel: out of memory for ", bytes, " bytes of scratch");
  return Buffer(ptr);
}

// The fp32 K/V copies, kept per calling thread between calls: a fresh multi-MB buffer each call costs a page
// fault per 4 KiB (measured: MHA S=512 lost a fifth of its speed to them). Huge pages where the kernel allows.
float* kv_scratch(int64_t floats) {
  constexpr size_t kHugePage = size_t(2) << 20;
  thread_local Buffer buffer;
  thread_local int64_t capacity = 0;
  if (floats > capacity) {
    buffer.reset();
    const size_t bytes = (static_cast<size_t>(floats) * sizeof(float) + kHugePage - 1) / kHugePage * kHugePage;
    auto* ptr = static_cast<float*>(std::aligned_alloc(kHugePage, bytes));
    TORCH_CHECK(ptr != nullptr, "vllm_pfa native kernel: out of memory for ", bytes, " bytes of scratch");
    madvise(ptr, bytes, MADV_HUGEPAGE);  // advisory: ignored where unsupported
    buffer.reset(ptr);
    capacity = static_cast<int64_t>(bytes / sizeof(float));
  }
  return buffer.get();
}

// Per-thread scratch of one query block (reused between calls, like kv_scratch).
const kernel::Scratch& block_scratch(int64_t rows, int64_t padded_dim) {
  thread_local Buffer floats;
  thread_local std::vector<int64_t> bounds;
  thread_local kernel::Scratch scratch{};
  thread_local int64_t shape[2] = {0, 0};
  if (shape[0] != rows || shape[1] != padded_dim) {
    const int64_t matrix = rows * std::max<int64_t>(padded_dim, kKeyBlock);
    floats = allocate(3 * matrix + 3 * rows);
    bounds.assign(3 * rows, 0);
    float* f = floats.get();
    scratch = {f, f + matrix, f + 2 * matrix, f + 3 * matrix, f + 3 * matrix + rows, f + 3 * matrix + 2 * rows,
               bounds.data(), bounds.data() + rows, bounds.data() + 2 * rows, bounds.data() + 2 * rows + rows / 2};
    shape[0] = rows;
    shape[1] = padded_dim;
  }
  return scratch;
}

ElementType element_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default: TORCH_CHECK(false, "vllm_pfa native kernel: unsupported dtype ", t.scalar_type());
  }
}

Strides strides_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "vllm_pfa native kernel: ", name,
              " must be a [B, N, S, D] view with a contiguous D");
  return {t.stride(0), t.stride(1), t.stride(2)};
}

}  // namespace

bool cpu_supported() {
  // Asked once: the gather calls this per (block, head).
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return supported;
}

// Writes rows [0, q_lens[b]) of `out` ([B, N, S1, D]) for every batch b; see the header comment for the band.
void prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                       const std::vector<int64_t>& q_lens, const std::vector<int64_t>& kv_lens,
                       const std::vector<int64_t>& lo_offsets, const std::vector<int64_t>& hi_offsets, double scale) {
  TORCH_CHECK(cpu_supported(), "vllm_pfa native kernel: this CPU lacks AVX-512");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && out.device().is_cpu(),
              "vllm_pfa native kernel: CPU tensors only");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "vllm_pfa native kernel: query, key, value and out must share one dtype");
  const int64_t batches = q.size(0), heads = q.size(1), head_dim = q.size(3), kv_heads = k.size(1);
  TORCH_CHECK(k.size(0) == batches && v.size(0) == batches && out.size(0) == batches, "batch sizes differ");
  TORCH_CHECK(v.size(1) == kv_heads && kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(k.size(3) == head_dim && v.size(3) == head_dim && out.sizes() == q.sizes(), "shapes differ");
  TORCH_CHECK(head_dim <= 512, "head_dim > 512");
  const auto n = static_cast<size_t>(batches);
  TORCH_CHECK(q_lens.size() == n && kv_lens.size() == n && lo_offsets.size() == n && hi_offsets.size() == n,
              "one q_len, kv_len and band per batch");
  Problem p{q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
            strides_of(q, "query"), strides_of(k, "key"), strides_of(v, "value"), strides_of(out, "out"),
            element_type(q), heads, kv_heads, head_dim, (head_dim + 15) / 16 * 16,
            static_cast<float>(scale * M_LOG2E)};
  const int64_t group = heads / kv_heads;
  const int64_t positions_per_block = std::max<int64_t>(1, kRowsPerQueryBlock / group);
  const int64_t scratch_rows = (positions_per_block * group + kRowTile - 1) / kRowTile * kRowTile;
  const int64_t dp = p.padded_dim;

  // Units of work: one (batch, kv head) each, with the 16-key tiles its rows can keep.
  struct Unit {
    int64_t batch, kv_head, key_start, key_end;  // key_end rounded up to a whole tile
    BatchBand band;
    float *key_t, *value;
  };
  std::vector<Unit> units;
  for (int64_t b = 0; b < batches; ++b) {
    TORCH_CHECK(0 <= q_lens[b] && q_lens[b] <= q.size(2) && 0 <= kv_lens[b] && kv_lens[b] <= k.size(2) &&
                    kv_lens[b] <= v.size(2),
                "actual lengths out of range");
    const BatchBand band{q_lens[b], kv_lens[b], lo_offsets[b], hi_offsets[b]};
    if (band.q_len == 0) continue;
    const int64_t key_end = std::max<int64_t>(0, band.row_hi(band.q_len - 1));
    const int64_t key_start = std::min(band.row_lo(0), key_end) / 16 * 16;
    for (int64_t h = 0; h < kv_heads; ++h) units.push_back({b, h, key_start, (key_end + 15) / 16 * 16, band});
  }
  struct Item {
    size_t unit, unit_end;  // units [unit, unit_end): one for a query block, a batch's heads for a conversion
    int64_t begin, end;     // key tiles to convert, or query positions to attend
    int64_t cost;           // to hand out the heaviest first
  };
  auto query_blocks = [&](size_t u, std::vector<Item>& blocks) {
    const BatchBand& band = units[u].band;
    for (int64_t pos = 0; pos < band.q_len; pos += positions_per_block) {
      const int64_t last = std::min(pos + positions_per_block, band.q_len);
      const int64_t keys = std::max<int64_t>(0, band.row_hi(last - 1) - band.row_lo(pos));
      blocks.push_back({u, u + 1, pos, last, keys * (last - pos)});
    }
  };
  // Heaviest items first, handed out dynamically: causal triangles and mixed lengths balance across threads.
  auto run_dynamic = [](std::vector<Item>& items, auto&& work) {
    std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
    std::atomic<size_t> next{0};
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items.size()), 1, [&](int64_t, int64_t) {
      for (size_t i = next++; i < items.size(); i = next++) work(items[i]);
    });
  };
  auto attend = [&](const Unit& unit, const Item& block) {
    kernel::attend_block(p, unit.band, unit.batch, unit.kv_head, block.begin, block.end - block.begin, unit.key_t,
                         unit.value, block_scratch(scratch_rows, dp));
  };
  auto convert = [&](const Unit& unit, int64_t begin, int64_t end) {
    kernel::convert_keys(p, unit.batch, unit.kv_head, unit.band.kv_len, begin, end, unit.key_t, unit.value);
  };
  auto unit_floats = [&](const Unit& unit) { return (unit.key_end + kKeyBlock) * dp; };

  const int64_t threads = at::get_num_threads();
  const auto n_units = static_cast<int64_t>(units.size());
  if (n_units >= 2 * threads && (n_units % threads == 0 || n_units >= 8 * threads)) {
    // Many units: each thread converts one unit's K/V into its own scratch and attends all its query blocks while
    // the copy is hot in its L2. (Shared copies of many units stream through memory: MHA lost ~15% to that.)
    std::vector<std::vector<Item>> unit_blocks(units.size());
    std::vector<Item> work;
    for (size_t u = 0; u < units.size(); ++u) {
      query_blocks(u, unit_blocks[u]);
      int64_t cost = 0;
      for (const Item& block : unit_blocks[u]) cost += block.cost;
      work.push_back({u, u + 1, 0, 0, cost});
    }
    run_dynamic(work, [&](const Item& item) {
      Unit unit = units[item.unit];
      unit.key_t = kv_scratch(2 * unit_floats(unit));
      unit.value = unit.key_t + unit_floats(unit);
      convert(unit, unit.key_start, unit.key_end);
      for (const Item& block : unit_blocks[item.unit]) attend(unit, block);
    });
    return;
  }
  // Few units: all threads convert a group of units' K/V, then all attend its query blocks. Groups are bounded so
  // memory stays O(S * D) for any problem size.
  const int64_t budget_floats = int64_t(32) << 20 >> 2;  // 32 MiB
  for (size_t first_unit = 0; first_unit < units.size();) {
    size_t end_unit = first_unit;
    int64_t floats = 0;
    std::vector<int64_t> offsets;
    while (end_unit < units.size()) {
      const int64_t need = 2 * unit_floats(units[end_unit]);
      if (end_unit > first_unit && floats + need > budget_floats) break;
      offsets.push_back(floats);
      floats += need;
      ++end_unit;
    }
    float* kv_copy = kv_scratch(floats);
    std::vector<Item> conversions, blocks;
    for (size_t u = first_unit; u < end_unit; ++u) {
      Unit& unit = units[u];
      unit.key_t = kv_copy + offsets[u - first_unit];
      unit.value = unit.key_t + unit_floats(unit);
      // One conversion item: 8 key tiles of every head of this batch in the group, head-inner, so each token's
      // K/V (contiguous in BSND) is read in one run.
      if (u == first_unit || units[u - 1].batch != unit.batch) {
        size_t heads_end = u;
        while (heads_end < end_unit && units[heads_end].batch == unit.batch) ++heads_end;
        for (int64_t tile = unit.key_start; tile < unit.key_end; tile += 8 * 16) {
          const int64_t tile_end = std::min(tile + 8 * 16, unit.key_end);
          conversions.push_back({u, heads_end, tile, tile_end, (tile_end - tile) * int64_t(heads_end - u)});
        }
      }
      query_blocks(u, blocks);
    }
    run_dynamic(conversions, [&](const Item& item) {
      for (int64_t tile = item.begin; tile < item.end; tile += 16) {
        for (size_t u = item.unit; u < item.unit_end; ++u) convert(units[u], tile, tile + 16);
      }
    });
    run_dynamic(blocks, [&](const Item& block) { attend(units[block.unit], block); });
    first_unit = end_unit;
  }
}

}  // namespace vllm_pfa
