// Native CPU prefill attention for PFA's float cases: a flash-attention kernel in AVX-512.
//
// Exact semantics of the band PFA's sparse modes reduce to: query row i (< q_len) of a batch attends keys
// j in [i + lo_offset, i + hi_offset] clipped to [0, kv_len); rows with no key are 0. The rows past q_len are
// left to the caller. The kernel never materializes S1 x S2: per (batch, kv head) it converts K (transposed,
// in key blocks) and V to fp32 once, then every block of query positions walks only the key blocks its band
// touches, with an online softmax. The `group` query heads sharing a kv head are packed into one block of rows
// so GQA reads K/V once. The softmax is fp32 (exp2, online; scale * log2(e) is folded into an fp32 Q, or applied
// to the fp32 scores of 16-bit products, where a scaled Q would be rounded), the output is rounded once to the
// output dtype (round-to-nearest-even). The two matrix products run one of two ways:
// - in the 16-bit input dtype (bf16/fp16 inputs, where oneDNN has micro-kernels for this CPU: AVX512-BF16, AMX):
//   K and V are packed once per unit in the VNNI pair layout and every Q K^T and P V block is one product with fp32
//   accumulation: bf16 on the kernel's own AMX tiles where the CPU has AMX-BF16 (amx_products.cpp: TDPBF16PS, as
//   oneDNN's AMX kernels, without brgemm's kernel lookup and tile configuration per call), in this file's VDPBF16PS
//   register tiles on a CPU with AVX512-BF16 and no AMX (the instruction oneDNN uses there, without its per-call
//   cost; bf16_products), fp16 through an at::native::cpublas::brgemm call (AMX-FP16). P is rounded to the input
//   dtype before P V, as the
//   NPU does (its cube unit takes 16-bit operands); the row sums use the rounded weights, so each output row is a
//   convex combination of V rows with weights exact to the input dtype's precision (bf16: 2^-9 relative).
// - in fp32 (everything else): K/V converted to fp32, hand-written AVX-512 FMA register tiles. oneDNN's fp32
//   brgemm measured slower here than these tiles (about 115 vs 140 GFLOP/s per core), and without bf16
//   instructions its bf16 kernels do not exist (and PyTorch's non-VNNI fallback runs at 1-5 GFLOP/s).
// A third mode, for tests on any AVX-512 CPU, runs the 16-bit path with an AVX-512F emulation of the products.
//
// Work is split by (batch, kv head) "units": with many units each thread takes whole units (its K/V copy stays
// in its L2); with few, all threads convert a group of units, then share its query blocks, heaviest first.
//
// Only the kernel section is compiled for AVX-512 (GCC target pragma); the binding checks the CPU at run time
// and Python routes elsewhere when it is missing, so the module loads on any x86-64.
//
// Where the time goes (perf samples; AMD EPYC Zen 4, AVX512-BF16, no AMX; bf16 causal, 2 threads): at N32/32 D64
// S=512 the products take 72% of the kernel's samples, the softmax 16.5%, attend_block's own work (loading Q,
// rescaling acc, writing the output rows, a page apart) 7%, packing K/V 4%; at D=128 and S >= 2048 the products 82%.
// The products run at the GEMM rate, so the share of that rate a shape reaches is set by the work beside them: the
// softmax (per score, so twice the products' weight at D=64 as at D=128), the packing (per key and kv head, against
// products per key that grow with S), the per-block bookkeeping. The kernel's own phase counters (phase_cycles.h,
// switched on at run time; benchmarks/kernel_phases.py) agree, same machine, 2 threads, bf16 causal, shares of the
// calls' thread time: D64 S=512 Q K^T 36-39%, P V 33-35%, softmax 14-15%, output 4-6%, packing 1-6% (MHA the most),
// Q 2%, the rest (scheduling, waiting) 2-4%; D128 S=2048 the products 86%, softmax 8.5%. On AMX the products run
// 2.3-5.9x faster than the VDPBF16PS tiles would (brgemm, measured on an Emerald Rapids Xeon) and the softmax and
// the per-row work dominate (the counters, Intel Xeon with AMX, 2 threads, bf16 causal, the kernel's own AMX tiles:
// GQA 32/8 D128 S=2048 Q K^T 24%, softmax 34%, P V 24%, output 9%, query 6%, packing 3%; D64 S=512 softmax 30-34%,
// the products 39-41%, query and output 15-20%, packing 4-13%); the counters are how to see it there, where no
// profiler runs. The figures behind the choices in this file (profiles, builds that skip a phase, in-process A/Bs of
// what was kept and what was not) are in benchmarks/kernel_performance.md; benchmarks/ab_builds.py repeats such an
// A/B.

#include "amx_products.h"
#include "ops.h"
#include "phase_cycles.h"
#include "transpose.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>

#include <cpuid.h>
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace vllm_pfa {

enum class ElementType : int { kFloat32, kFloat16, kBFloat16 };

// How the two matrix products are computed (see the header comment), decided once per call by parse_products: in
// fp32; in the input dtype through oneDNN's brgemm, this file's bf16 register tiles (bf16_products) or the AMX tiles
// (amx_products.cpp); or in the input dtype's emulation (tests).
enum class Products : int { kFloat32, kInputTypeOneDNN, kInputTypeTiles, kInputTypeAmx, kInputTypeEmulated };

constexpr int kRowTile = 6;           // register tile rows
constexpr int kColVectors = 4;        // register tile width in 16-float vectors (64 columns)
// Keys per block (a multiple of 16). In-process A/Bs of builds (benchmarks/ab_builds.py; six runs, bf16 causal, Zen 4):
// 512 against 256 +1-2% at S >= 1024, about +1% at S=512 (within noise where a control build ran); fp16 +0.3%; 384
// and 768 between, 1024 -0.8 to +1.6%.
constexpr int kKeyBlock = 512;
constexpr int kRowsPerQueryBlock = 96;  // packed (position, group head) rows per work item
// 16-bit products: positions per call where rows keep different keys (a block on a causal diagonal); oneDNN's
// brgemm costs a kernel-cache lookup per call, the register tiles (bf16_products) and the AMX tiles nearly nothing
// (on AMX, 16 and 48 positions measured within noise of 32: benchmarks/kernel_performance.md)
constexpr int kMatrixChunkPositions = 48;
constexpr int kTileChunkPositions = 16;
constexpr int kAmxChunkPositions = 32;
constexpr float kInf = std::numeric_limits<float>::infinity();

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
  Products products;
  const int64_t* out_starts;  // per batch, the out position of its query row 0 (out has B = 1); null: out's batches
  int64_t heads, kv_heads, head_dim, padded_dim;
  float score_scale;  // scale_value * log2(e)
  bool bf16_instructions;  // round P with AVX512-BF16 (the CPU has it, and the products are not emulated)
};

struct BatchBand {
  int64_t q_len, kv_len, lo_offset, hi_offset;
  int64_t row_lo(int64_t i) const { return std::max<int64_t>(0, i + lo_offset); }
  int64_t row_hi(int64_t i) const { return std::min<int64_t>(kv_len, i + hi_offset + 1); }
};

#pragma GCC push_options
// avx512bf16 only for the two instructions of WeightFormat::kBFloat16Instruction (VCVTNEPS2BF16 rounds the weights,
// VDPBF16PS sums them), which run only where the CPU has them; nothing else in this section may use it.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")

namespace kernel {

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// The lanes of columns [c, c + 16) that lie in [lo, hi).
inline __mmask16 columns_within(int64_t c, int64_t lo, int64_t hi) {
  const __m512i col = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                       _mm512_set1_epi32(static_cast<int>(c)));
  return _mm512_cmp_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(lo)), _MM_CMPINT_NLT) &
         _mm512_cmp_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(hi)), _MM_CMPINT_LT);
}

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

// 16 floats rounded to a 16-bit type, round to nearest even; NaN stays a quiet NaN.
inline __m256i narrow16(__m512 x, ElementType type) {
  if (type == ElementType::kFloat16) return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512i bits = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

inline void store16(void* p, ElementType type, __m512 x, __mmask16 m) {
  if (type == ElementType::kFloat32) {
    _mm512_mask_storeu_ps(p, m, x);
  } else {
    _mm256_mask_storeu_epi16(p, m, narrow16(x, type));
  }
}

// One PREFETCHT1 (into L2, not L1) per 64-byte line of [row, row + bytes). The rows prefetched are a token apart, a
// multiple of 4 KiB at 32 heads x D64 16-bit, so they all map to the same L1 sets (8 ways), where PREFETCHT0's lines
// are evicted before they are read. In volatile asm: GCC models _mm_prefetch as free of side effects, found a
// function made only of prefetches "const" and deleted its calls (an earlier version's K/V prefetch never reached the
// binary); asm volatile stays where it is written.
inline void prefetch_row(const char* row, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += 64) __asm__ volatile("prefetcht1 %0" : : "m"(row[offset]));
}

// One PREFETCHW (into L1, the line owned for writing) per 64-byte line of [row, row + bytes); every AVX-512 CPU has
// the instruction. In volatile asm, as prefetch_row.
inline void prefetch_for_write(const char* row, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += 64) __asm__ volatile("prefetchw %0" : : "m"(row[offset]));
}

inline int64_t element_bytes(ElementType type) { return type == ElementType::kFloat32 ? 4 : 2; }

inline const char* at_element(const void* base, ElementType type, int64_t offset) {
  return static_cast<const char*>(base) + offset * element_bytes(type);
}

// 2^x for x <= 0 as 2^n * q(f), n = round(x), f = x - n in [-0.5, 0.5], q a polynomial (coefficients from the highest
// degree); exactly 0 below 2^-126 (and for -inf, the masked scores). kZeroBelow false skips that compare for a caller
// that flushes subnormal results itself and masks the lanes of -inf inputs, whose f is NaN (VCVTNEPS2BF16 reads a
// subnormal input as 0, and what is subnormal here is exactly what the compare zeroes): one instruction of ~14 per 16
// weights. (VSCALEFPS of that NaN by 2^-inf gave 0 on an Intel Xeon with AMX; softmax_rows_finite takes either.)
template <bool kZeroBelow = true, size_t kTerms>
inline __m512 exp2_nonpositive(__m512 x, const float (&coefficients)[kTerms]) {
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(x, n);
  __m512 q = _mm512_set1_ps(coefficients[0]);
#pragma GCC unroll 8
  for (size_t i = 1; i < kTerms; ++i) q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(coefficients[i]));
  if constexpr (!kZeroBelow) return _mm512_scalef_ps(q, n);
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ), q, n);
}

// Degree-7 Taylor of 2^f: within 1e-8 relative on [-0.5, 0.5], for fp32 weights.
constexpr float kExp2Float32[] = {1.525273380405984e-05f, 1.5403530393381606e-04f, 1.3333558146428443e-03f,
                                  9.618129107628477e-03f, 5.550410866482158e-02f,   2.402265069591007e-01f,
                                  6.931471805599453e-01f, 1.0f};

// The two operands of a register tile's products and their multiply-add: A row-major; B [depth][ldb] in fp32 (one
// element of depth per step), or bf16 in VNNI pairs ([depth / 2][ldb][2]: a pair of depth per step, one VDPBF16PS per
// 16 outputs as in oneDNN's AVX512-BF16 kernels, the pair's two products exact, added to the fp32 sum with one
// rounding).
template <typename Element>
struct TileOperands {
  static_assert(std::is_same_v<Element, float> || std::is_same_v<Element, uint16_t>);
  static constexpr bool kPairs = std::is_same_v<Element, uint16_t>;
  static constexpr int64_t kDepthStep = kPairs ? 2 : 1;
  const Element* a;
  int64_t lda;
  const Element* b;
  int64_t ldb;
  auto a_at(int r, int64_t k) const {
    if constexpr (kPairs) {
      return reinterpret_cast<__m512bh>(_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a + r * lda + k)));
    } else {
      return _mm512_set1_ps(a[r * lda + k]);
    }
  }
  auto b_at(int64_t k, int v) const {
    if constexpr (kPairs) {
      return reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + (k / 2 * ldb + 16 * v) * 2));
    } else {
      return _mm512_loadu_ps(b + k * ldb + 16 * v);
    }
  }
  template <typename Step>
  static __m512 madd(__m512 acc, Step a_step, Step b_step) {
    if constexpr (kPairs) {
      return _mm512_dpbf16_ps(acc, a_step, b_step);
    } else {
      return _mm512_fmadd_ps(a_step, b_step, acc);
    }
  }
  TileOperands from(int64_t row, int64_t col) const { return {a + row * lda, lda, b + kDepthStep * col, ldb}; }
};

// C[R x 16 NV] = (accumulate ? diag(alpha) C : 0) + A[R x depth] B[depth x 16 NV] (alpha null: 1), fp32 C: a register
// tile of R x NV accumulators.
template <int R, int NV, typename Operands>
inline void register_tile(const Operands& x, float* c, int64_t ldc, int64_t depth, bool accumulate,
                          const float* alpha) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 scale = _mm512_set1_ps(alpha ? alpha[r] : 1.0f);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? _mm512_mul_ps(_mm512_loadu_ps(c + r * ldc + 16 * v), scale) : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < depth; k += Operands::kDepthStep) {
    decltype(x.b_at(0, 0)) b_step[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b_step[v] = x.b_at(k, v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const auto a_step = x.a_at(r, k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = Operands::madd(acc[r][v], a_step, b_step[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
  }
}

// R rows of C[R x n_cols] (n_cols a multiple of 16) in register tiles across the columns.
template <int R, typename Operands>
inline void register_rows(const Operands& x, float* c, int64_t ldc, int64_t depth, int64_t n_cols, bool accumulate,
                          const float* alpha) {
  int64_t col = 0;
  for (; col + 16 * kColVectors <= n_cols; col += 16 * kColVectors) {
    register_tile<R, kColVectors>(x.from(0, col), c + col, ldc, depth, accumulate, alpha);
  }
  switch ((n_cols - col) / 16) {
    case 3: register_tile<R, 3>(x.from(0, col), c + col, ldc, depth, accumulate, alpha); break;
    case 2: register_tile<R, 2>(x.from(0, col), c + col, ldc, depth, accumulate, alpha); break;
    case 1: register_tile<R, 1>(x.from(0, col), c + col, ldc, depth, accumulate, alpha); break;
    default: break;
  }
}

// A row tile of fp32 products over [depth x width]: C = (alpha ? diag(alpha) C : 0) + A B.
inline void gemm_rows(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t depth,
                      int64_t width, const float* alpha) {
  register_rows<kRowTile>(TileOperands<float>{a, lda, b, ldb}, c, ldc, depth, width, alpha != nullptr, alpha);
}

inline const char* key_row(const Problem& p, const void* base, const Strides& st, int64_t batch, int64_t kv_head,
                           int64_t key) {
  return at_element(base, p.type, batch * st.batch + kv_head * st.head + key * st.seq);
}

// The K and V rows of keys [begin, end) of one kv head, prefetched into L2: the conversions ask for their rows two
// tiles ahead (measurements: benchmarks/kernel_performance.md).
constexpr int64_t kPrefetchKeys = 32;
inline void prefetch_keys(const Problem& p, int64_t batch, int64_t kv_head, int64_t begin, int64_t end) {
  const int64_t row_bytes = p.head_dim * element_bytes(p.type);
  for (int64_t key = begin; key < end; ++key) {
    prefetch_row(key_row(p, p.k, p.ks, batch, kv_head, key), row_bytes);
    prefetch_row(key_row(p, p.v, p.vs, batch, kv_head, key), row_bytes);
  }
}

// What a conversion of keys [key_start, key_end) prefetches before its tile at `tile`: the tile two ahead, and at the
// start the first two tiles (a range of one tile is a caller's walk over tiles, which the previous call prefetched).
inline void prefetch_for_tile(const Problem& p, int64_t batch, int64_t kv_head, int64_t kv_len, int64_t key_start,
                              int64_t key_end, int64_t tile) {
  if (tile == key_start && key_end - key_start > 16) {
    prefetch_keys(p, batch, kv_head, key_start, std::min(key_start + kPrefetchKeys, kv_len));
  }
  prefetch_keys(p, batch, kv_head, tile + kPrefetchKeys, std::min(tile + kPrefetchKeys + 16, kv_len));
}

// Keys [key_start, key_end) of one kv head into fp32: K transposed per key block ([block][dim][kKeyBlock]) and V
// row-major ([key][padded_dim]); keys past kv_len and dims past head_dim are 0 (finite, so masked products vanish).
void convert_keys(const Problem& p, int64_t batch, int64_t kv_head, int64_t kv_len, int64_t key_start, int64_t key_end,
                  float* key_t, float* value, uint8_t* nonfinite_tiles) {
  const int64_t dp = p.padded_dim;
  for (int64_t tile = key_start; tile < key_end; tile += 16) {
    prefetch_for_tile(p, batch, kv_head, kv_len, key_start, key_end, tile);
    float* kt = key_t + (tile / kKeyBlock) * dp * kKeyBlock + tile % kKeyBlock;
    for (int64_t d = 0; d < dp; d += 16) {  // 16 keys x 16 dims, transposed
      __m512i block[16];
      for (int64_t j = 0; j < 16; ++j) {
        const __mmask16 m = tile + j < kv_len ? tail_mask(p.head_dim - d) : __mmask16(0);
        block[j] = _mm512_castps_si512(
            load16(at_element(key_row(p, p.k, p.ks, batch, kv_head, tile + j), p.type, d), p.type, m));
      }
      transpose_16x16(block);
      for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(kt + (d + i) * kKeyBlock, block[i]);
    }
    __mmask16 nonfinite = 0;
    for (int64_t key = tile; key < tile + 16; ++key) {
      for (int64_t d = 0; d < dp; d += 16) {
        const __mmask16 m = key < kv_len ? tail_mask(p.head_dim - d) : __mmask16(0);
        const __m512 v = load16(at_element(key_row(p, p.v, p.vs, batch, kv_head, key), p.type, d), p.type, m);
        nonfinite |= _mm512_fpclass_ps_mask(v, 0x99);  // NaN, +-inf
        _mm512_storeu_ps(value + key * dp + d, v);
      }
    }
    nonfinite_tiles[tile / 16] = nonfinite != 0;
  }
}

// Keys [key_start, key_end) of one kv head in the 16-bit input dtype, packed as brgemm's VNNI operands: K^T per key
// block as [padded_dim / 2][kKeyBlock][2] (a key's dim pairs) and V as [key / 2][padded_dim][2] (a dim's key pairs);
// keys past kv_len and dims past head_dim are 0.
void pack_keys(const Problem& p, int64_t batch, int64_t kv_head, int64_t kv_len, int64_t key_start, int64_t key_end,
               uint16_t* key_t, uint16_t* value, uint8_t* nonfinite_tiles) {
  const int64_t dp = p.padded_dim;
  // Two keys' 32-dim runs a, b interleaved: a0 b0 a1 b1 ... a15 b15, then a16 b16 ... a31 b31 (b's words are 32-63)
  alignas(64) int16_t low_index[32], high_index[32];
  for (int i = 0; i < 16; ++i) {
    low_index[2 * i] = static_cast<int16_t>(i);
    low_index[2 * i + 1] = static_cast<int16_t>(32 + i);
    high_index[2 * i] = static_cast<int16_t>(16 + i);
    high_index[2 * i + 1] = static_cast<int16_t>(48 + i);
  }
  const __m512i interleave_low = _mm512_load_si512(low_index), interleave_high = _mm512_load_si512(high_index);
  const __m512i exponent = _mm512_set1_epi16(static_cast<int16_t>(p.type == ElementType::kBFloat16 ? 0x7F80 : 0x7C00));
  // 32 elements of a key's K or V row from dim d (0 past head_dim or kv_len)
  auto load_run = [&](const void* base, const Strides& st, int64_t key, int64_t d) {
    const int64_t n = p.head_dim - d;
    const __mmask32 m = key >= kv_len ? __mmask32(0) : n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
    return _mm512_maskz_loadu_epi16(m, at_element(key_row(p, base, st, batch, kv_head, key), p.type, d));
  };
  for (int64_t tile = key_start; tile < key_end; tile += 16) {
    prefetch_for_tile(p, batch, kv_head, kv_len, key_start, key_end, tile);
    // K^T: a key's dim pair is one 32-bit word, so 16 keys x 16 pairs is one 32-bit transpose
    auto* kt = reinterpret_cast<uint32_t*>(key_t + (tile / kKeyBlock) * dp * kKeyBlock) + tile % kKeyBlock;
    for (int64_t d = 0; d < dp; d += 32) {
      __m512i block[16];
      for (int64_t j = 0; j < 16; ++j) block[j] = load_run(p.k, p.ks, tile + j, d);
      transpose_16x16(block);
      for (int64_t i = 0; i < std::min<int64_t>(16, (dp - d) / 2); ++i) {
        _mm512_storeu_si512(kt + (d / 2 + i) * kKeyBlock, block[i]);
      }
    }
    __mmask32 nonfinite = 0;
    for (int64_t key = tile; key < tile + 16; key += 2) {
      for (int64_t d = 0; d < dp; d += 32) {
        const __m512i a = load_run(p.v, p.vs, key, d), b = load_run(p.v, p.vs, key + 1, d);
        nonfinite |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(a, exponent), exponent) |  // NaN, +-inf
                     _mm512_cmpeq_epi16_mask(_mm512_and_si512(b, exponent), exponent);
        uint16_t* out = value + (key / 2 * dp + d) * 2;
        _mm512_storeu_si512(out, _mm512_permutex2var_epi16(a, interleave_low, b));
        if (d + 16 < dp) _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(a, interleave_high, b));
      }
    }
    nonfinite_tiles[tile / 16] = nonfinite != 0;
  }
}

// 16 values of a 16-bit type, from the low (or high) halves of 16 words, as floats.
inline __m512 widen_half(__m512i words, bool high, ElementType type) {
  if (type == ElementType::kBFloat16) {
    return _mm512_castsi512_ps(high ? _mm512_and_si512(words, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))
                                    : _mm512_slli_epi32(words, 16));
  }
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(high ? _mm512_srli_epi32(words, 16) : words));
}

inline float widen_scalar(uint16_t bits, ElementType type) {
  return _mm512_cvtss_f32(widen_half(_mm512_set1_epi32(bits), false, type));
}

// products_16bit's bf16 case on a CPU with AVX512-BF16 and no AMX, in register tiles of kRowTile rows: written here
// rather than taken from oneDNN because PyTorch's brgemm looks its kernel up in a cache on every call (~130 ns; 2-3% of
// MHA's time at S = 512), which also made small calls on a causal diagonal cost more than they saved. These run at
// oneDNN's rate (Zen 4, in-process A/B: within 1% at S = 2048) and take calls of 16 positions there.
void bf16_products(int64_t m_rows, int64_t n_cols, int64_t depth, int64_t lda, int64_t ldb, int64_t ldc,
                   bool accumulate, const float* alpha, const uint16_t* a, const uint16_t* b, float* c) {
  const TileOperands<uint16_t> x{a, lda, b, ldb};
  int64_t r = 0;
  for (; r + kRowTile <= m_rows; r += kRowTile) {
    register_rows<kRowTile>(x.from(r, 0), c + r * ldc, ldc, depth, n_cols, accumulate, alpha ? alpha + r : alpha);
  }
  const TileOperands<uint16_t> tail = x.from(r, 0);
  float* tail_c = c + r * ldc;
  const float* tail_alpha = alpha ? alpha + r : alpha;
  switch (m_rows - r) {
    case 5: register_rows<5>(tail, tail_c, ldc, depth, n_cols, accumulate, tail_alpha); break;
    case 4: register_rows<4>(tail, tail_c, ldc, depth, n_cols, accumulate, tail_alpha); break;
    case 3: register_rows<3>(tail, tail_c, ldc, depth, n_cols, accumulate, tail_alpha); break;
    case 2: register_rows<2>(tail, tail_c, ldc, depth, n_cols, accumulate, tail_alpha); break;
    case 1: register_rows<1>(tail, tail_c, ldc, depth, n_cols, accumulate, tail_alpha); break;
    default: break;
  }
}

// C[M x N] = (accumulate ? diag(alpha) C : 0) + A[M x K] B[K x N] (alpha null: 1) with fp32 C: A row-major and B in
// VNNI pairs ([K / 2][ldb][2]), both 16-bit of p.type; N a multiple of 16 and K of 2.
void products_16bit(const Problem& p, int64_t m_rows, int64_t n_cols, int64_t depth, int64_t lda, int64_t ldb,
                    int64_t ldc, bool accumulate, const float* alpha, const uint16_t* a, const uint16_t* b, float* c) {
  if (p.products == Products::kInputTypeTiles) {
    return bf16_products(m_rows, n_cols, depth, lda, ldb, ldc, accumulate, alpha, a, b, c);
  }
  for (int64_t m = 0; accumulate && alpha && m < m_rows; ++m) {  // the others scale C first
    if (alpha[m] == 1.0f) continue;
    const __m512 scale = _mm512_set1_ps(alpha[m]);
    for (int64_t n = 0; n < n_cols; n += 16) {
      _mm512_storeu_ps(c + m * ldc + n, _mm512_mul_ps(_mm512_loadu_ps(c + m * ldc + n), scale));
    }
  }
  if (p.products == Products::kInputTypeAmx) {
    return amx::bf16_products(m_rows, n_cols, depth, lda, ldb, ldc, accumulate, a, b, c);
  }
  if (p.products == Products::kInputTypeOneDNN) {
    if (p.type == ElementType::kBFloat16) {
      at::native::cpublas::brgemm(m_rows, n_cols, depth, lda, ldb, ldc, accumulate,
                                  reinterpret_cast<const at::BFloat16*>(a), reinterpret_cast<const at::BFloat16*>(b),
                                  c);
    } else {
      at::native::cpublas::brgemm(m_rows, n_cols, depth, lda, ldb, ldc, accumulate,
                                  reinterpret_cast<const at::Half*>(a), reinterpret_cast<const at::Half*>(b), c);
    }
    return;
  }
  // The emulation: a product of two 16-bit floats is exact in fp32, as in the instructions; only the order of the
  // fp32 sums may differ from oneDNN's. One row at a time: slow, for tests.
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t n = 0; n < n_cols; n += 16) {
      __m512 acc = accumulate ? _mm512_loadu_ps(c + m * ldc + n) : _mm512_setzero_ps();
      for (int64_t k = 0; k < depth; k += 2) {
        const __m512i pair = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a + m * lda + k));
        const __m512i words = _mm512_loadu_si512(b + (k / 2 * ldb + n) * 2);
        acc = _mm512_fmadd_ps(widen_half(pair, false, p.type), widen_half(words, false, p.type), acc);
        acc = _mm512_fmadd_ps(widen_half(pair, true, p.type), widen_half(words, true, p.type), acc);
      }
      _mm512_storeu_ps(c + m * ldc + n, acc);
    }
  }
}

// How the 16-bit path forms P: 2^x over x in [-126, 0] and the rounding to the input dtype. P is rounded to the input
// dtype anyway, so the polynomial only needs to be well inside half a unit of that dtype's last place: degree 4 for
// bf16 (relative error 2.7e-6, half an ulp 2^-9), degree 5 for fp16 (2.3e-7, half an ulp 2^-11), fitted on
// [-0.5, 0.5] (minimax by reweighted least squares), against degree 7 for the fp32 path. 2^0 still rounds to
// exactly 1. With AVX512-BF16, one VCVTNEPS2BF16 rounds to nearest even (its denormal flush never applies: weights
// are 0 or >= 2^-126).
// kFloat32: the fp32 products' weights, unrounded and written over their scores (degree 7, as the general path).
enum class WeightFormat : int { kFloat32, kFloat16, kBFloat16, kBFloat16Instruction };

// Minimax on [-0.5, 0.5] (reweighted least squares): degree 5 for fp16 weights, 4 for bf16.
constexpr float kExp2Float16Weights[] = {1.327483681961894e-03f, 9.67552699148655e-03f, 5.550718307495117e-02f,
                                         2.4022120237350464e-01f, 6.931469440460205e-01f, 1.0000001192092896f};
constexpr float kExp2BFloat16Weights[] = {9.568454697728157e-03f, 5.591772124171257e-02f, 2.4024786055088043e-01f,
                                          6.931218504905701e-01f, 9.999992251396179e-01f};

template <WeightFormat kFormat>
inline __m512 exp2_weights(__m512 x) {
  if constexpr (kFormat == WeightFormat::kFloat32) return exp2_nonpositive(x, kExp2Float32);
  if constexpr (kFormat == WeightFormat::kFloat16) return exp2_nonpositive(x, kExp2Float16Weights);
  if constexpr (kFormat == WeightFormat::kBFloat16Instruction) {
    return exp2_nonpositive<false>(x, kExp2BFloat16Weights);  // narrow_weights rounds with VCVTNEPS2BF16
  }
  return exp2_nonpositive(x, kExp2BFloat16Weights);
}

template <WeightFormat kFormat>
inline __m256i narrow_weights(__m512 x) {
  if constexpr (kFormat == WeightFormat::kFloat16) return narrow16(x, ElementType::kFloat16);
  if constexpr (kFormat == WeightFormat::kBFloat16) return narrow16(x, ElementType::kBFloat16);
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
}

// Lane i of the result: v[i]'s 16 lanes reduced by op, for 16 vectors at once in a transposing tree (45
// instructions and four steps of latency, where one vector's own reduction takes 8 dependent ones).
template <typename Op>
inline __m512 reduce_each(const __m512 (&v)[16], Op op) {
  __m512 pairs[8], quads[4], halves[2];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {  // per 128-bit lane: (v[2j], v[2j + 1], v[2j], v[2j + 1])
    pairs[j] = op(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: v[4j .. 4j + 3]
    quads[j] = op(_mm512_shuffle_ps(pairs[2 * j], pairs[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                  _mm512_shuffle_ps(pairs[2 * j], pairs[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
#pragma GCC unroll 2
  for (int j = 0; j < 2; ++j) {  // 128-bit lanes: v[8j .. 8j + 3] twice, v[8j + 4 .. 8j + 7] twice
    halves[j] = op(_mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                   _mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return op(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
            _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

struct MaxOp {
  __m512 operator()(__m512 a, __m512 b) const { return _mm512_max_ps(a, b); }
};
struct AddOp {
  __m512 operator()(__m512 a, __m512 b) const { return _mm512_add_ps(a, b); }
};

// The kept columns [lo, hi) and the columns the products read [score_lo, score_hi) of a group's rows, block-relative.
struct RowColumns {
  int64_t lo[16], hi[16], score_lo[16], score_hi[16];
};

template <WeightFormat kFormat>
using Weight = std::conditional_t<kFormat == WeightFormat::kFloat32, float, uint16_t>;

// The online-softmax step of up to 16 rows (bit i of `rows`: row i, its scores at scores + i * kKeyBlock) over one
// key block where their scores are finite: the fp32 products' (scaled already, through Q), and the 16-bit products'
// with a positive scale (every real model). For the latter the block max is taken over the raw fp32 products
// (scaling by s > 0 keeps their order) and each weight is exp2(round(x * s) - round(max * s)), so the scores are read
// twice and never written back (the general path scales and stores them first); the fp32 weights overwrite their
// scores (probs is the scores). Per 16 scores: one load, max and add in the first pass, and in the second a
// load-multiply, a subtraction, the polynomial, the rounding, a store and the sum; only the 16 columns holding lo or
// hi take a column mask. The rows' reductions (max, sum, finiteness), alpha's exp2 and the loads and stores of their
// state run once per 16 rows, a row per lane. Against one row at a time (builds compared in separate processes, Zen
// 4): bf16 causal S=512 MHA D64 +3-5%, GQA 32/8 D64 +3.7%, MHA D128 +2%; MHA D64 S=1024 +2.5%; GQA D128 S=2048 +1%;
// fp16 (fp32 weights) MHA D64 S=512 +2.4%. Returns the rows done; the others, unchanged, are for the general path:
// a NaN or inf among the kept scores (their sum is not finite: a huge finite sum is sent there too, harmlessly), a
// NaN row state, a scaled max that overflows. With AVX512-BF16's rounding the first pass takes no sum: there a NaN
// kept score makes its weight NaN (exp2_nonpositive<false>; VCVTNEPS2BF16 keeps it) and so the weights' sum, a -inf
// one weighs 0 (VSCALEFPS's 2^-inf, as the reference) or NaN, and +inf makes the block max infinite, so the rows whose
// weights do not sum to a finite value go to the general path after the second pass instead (it writes their weights
// again). Elsewhere a NaN score's weight is masked to 0, and VMAXPS may drop a NaN from the max, so the first pass's
// sum finds it.
template <WeightFormat kFormat>
__mmask16 softmax_rows_finite(float* scores, Weight<kFormat>* probs, __mmask16 rows, const RowColumns& columns,
                              float scale_value, float* row_max, float* row_sum, float* alpha) {
  constexpr ElementType type = kFormat == WeightFormat::kFloat16 ? ElementType::kFloat16 : ElementType::kBFloat16;
  constexpr bool kCheckWeights = kFormat == WeightFormat::kBFloat16Instruction;  // else the scores' sum
  const __m512 zero = _mm512_setzero_ps(), neg_inf = _mm512_set1_ps(-kInf), scale = _mm512_set1_ps(scale_value);
  __m512 vmax[16], vsum[16];  // vsum holds the first pass's plain sums (the finiteness check), then the weights'
#pragma GCC unroll 1
  for (int i = 0; i < 16; ++i) {
    vmax[i] = neg_inf;
    vsum[i] = zero;
    if (!((rows >> i) & 1)) continue;
    const float* row = scores + i * kKeyBlock;
    const int64_t lo = columns.lo[i], hi = columns.hi[i];
    int64_t c = lo;
    for (; c + 16 <= hi; c += 16) {
      const __m512 x = _mm512_loadu_ps(row + c);
      if constexpr (!kCheckWeights) vsum[i] = _mm512_add_ps(vsum[i], x);
      vmax[i] = _mm512_max_ps(vmax[i], x);
    }
    if (c < hi) {
      const __mmask16 m = tail_mask(hi - c);
      const __m512 x = _mm512_maskz_loadu_ps(m, row + c);
      if constexpr (!kCheckWeights) vsum[i] = _mm512_add_ps(vsum[i], x);
      vmax[i] = _mm512_mask_max_ps(vmax[i], m, vmax[i], x);
    }
  }
  auto finite = [](__m512 x) { return _mm512_cmp_ps_mask(_mm512_sub_ps(x, x), _mm512_setzero_ps(), _CMP_EQ_OQ); };
  const __m512 old_max = _mm512_maskz_loadu_ps(rows, row_max);
  const __m512 block_max = _mm512_mul_ps(reduce_each(vmax, MaxOp{}), scale);
  __mmask16 done = rows & finite(block_max) & _mm512_cmp_ps_mask(old_max, old_max, _CMP_ORD_Q);
  if constexpr (!kCheckWeights) done &= finite(reduce_each(vsum, AddOp{}));
  const __m512 new_max = _mm512_max_ps(old_max, block_max);  // old_max is -inf until a finite score is seen
  alignas(64) float shifts[16];
  _mm512_store_ps(shifts, new_max);
  // bf16 pairs (1, 1): with AVX512-BF16 one dot product adds a vector of rounded weights to the sum
  const __m512i ones = _mm512_set1_epi16(0x3F80);
#pragma GCC unroll 1
  for (int i = 0; i < 16; ++i) {
    vsum[i] = zero;
    if (!((done >> i) & 1)) continue;
    const float* row = scores + i * kKeyBlock;
    Weight<kFormat>* row_probs = probs + i * kKeyBlock;
    const int64_t lo = columns.lo[i], hi = columns.hi[i], score_hi = columns.score_hi[i];
    const __m512 shift = _mm512_set1_ps(shifts[i]);
    __m512 sum = zero;
    auto weights = [&](int64_t c, __mmask16 kept) {
      // round(x * s) - round(max * s), two roundings as in the general path: the row's max weighs exactly 1, and a
      // kept column's argument is <= 0 (rounding is monotonic). A fused x * s - max * s would leave the product's
      // rounding error, which for huge scores is a huge negative number (exp2 of it: 0); the empty asm keeps the
      // compiler from contracting the two into an FMA. The fp32 products' scores are scaled already. Columns not
      // kept may hold anything: masked to 0 after exp2.
      __m512 scaled = _mm512_loadu_ps(row + c);
      if constexpr (kFormat != WeightFormat::kFloat32) {
        scaled = _mm512_mul_ps(scaled, scale);
        __asm__("" : "+v"(scaled));
      }
      const __m512 e = _mm512_maskz_mov_ps(kept, exp2_weights<kFormat>(_mm512_sub_ps(scaled, shift)));
      if constexpr (kFormat == WeightFormat::kFloat32) {
        _mm512_storeu_ps(row_probs + c, e);
        sum = _mm512_add_ps(sum, e);
        return;
      }
      const __m256i narrow = narrow_weights<kFormat>(e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row_probs + c), narrow);
      if constexpr (kFormat == WeightFormat::kBFloat16Instruction) {
        sum = _mm512_dpbf16_ps(sum, reinterpret_cast<__m512bh>(_mm512_zextsi256_si512(narrow)),
                               reinterpret_cast<__m512bh>(ones));
      } else {
        sum = _mm512_add_ps(sum, widen_half(_mm512_cvtepu16_epi32(narrow), false, type));
      }
    };
    const int64_t all_kept_lo = std::min((lo + 15) / 16 * 16, score_hi), all_kept_hi = hi / 16 * 16;
    int64_t c = columns.score_lo[i];
    for (; c < all_kept_lo; c += 16) weights(c, columns_within(c, lo, hi));
    for (; c < all_kept_hi; c += 16) weights(c, __mmask16(0xFFFF));
    for (; c < score_hi; c += 16) weights(c, columns_within(c, lo, hi));
    vsum[i] = sum;
  }
  // alpha = exp2(old max - new max) by the fp32 path's polynomial (1e-8 relative), 0 while old max is -inf
  const __m512 rescale = exp2_nonpositive(_mm512_sub_ps(old_max, new_max), kExp2Float32);
  const __m512 weight_sums = reduce_each(vsum, AddOp{});
  if constexpr (kCheckWeights) done &= finite(weight_sums);
  _mm512_mask_storeu_ps(alpha, done, rescale);
  _mm512_mask_storeu_ps(row_sum, done, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(done, row_sum), rescale, weight_sums));
  _mm512_mask_storeu_ps(row_max, done, new_max);
  return done;
}

struct Scratch {
  float* q;       // [rows][padded_dim] (fp32 products)
  uint16_t* q16;  // [rows][padded_dim] (16-bit products)
  float* scores;  // [rows][kKeyBlock]
  uint16_t* probs16;  // [rows][kKeyBlock] the weights in the input dtype (16-bit products)
  float* acc;     // [rows][padded_dim]
  float* row_max;
  float* row_sum;
  float* alpha;
  int64_t* lo;       // [rows] first kept key
  int64_t* hi;       // [rows] one past the last kept key
  int64_t* tile_lo;  // [row groups] block-relative column range of the current key block
  int64_t* tile_hi;
};

// One block of query positions [first, first + count) of one kv head, all group heads. kMatrix: the 16-bit
// products (key_t and value packed by pack_keys), else fp32 (convert_keys).
template <bool kMatrix>
void attend_block(const Problem& p, const BatchBand& band, int64_t batch, int64_t kv_head, int64_t first,
                  int64_t count, const void* key_t, const void* value, const uint8_t* nonfinite_tiles,
                  const Scratch& s) {
  const int64_t group = p.heads / p.kv_heads;
  const int64_t dp = p.padded_dim;
  const int64_t rows = count * group;
  // fp32 register tiles take whole kRowTile rows (padding rows are 0); brgemm takes any number.
  const int64_t padded_rows = kMatrix ? rows : (rows + kRowTile - 1) / kRowTile * kRowTile;
  int64_t union_lo = std::numeric_limits<int64_t>::max(), union_hi = 0;
  const __m512 score_scale = _mm512_set1_ps(p.score_scale);
  // Row r is position first + r / group of query head kv_head * group + r % group.
  auto query_row = [&](int64_t r) {
    return at_element(p.q, p.type,
                      batch * p.qs.batch + (kv_head * group + r % group) * p.qs.head + (first + r / group) * p.qs.seq);
  };
  // One query head's rows are its positions at one stride: with no padded dims the 16-bit products read them in
  // place, a call per head of the group. Copied, each row (a token apart, a page apart where tokens are wide) is a
  // cache miss the copy waits on. Zen 4, bf16 causal, S=512: MHA +6-8%; GQA +2% (four calls of a quarter the rows
  // cost about what the copy did), S >= 1024 within 1%. On AMX a GQA head's rows are copied: in place a head's 96 /
  // group rows fill 16-row tiles only partly (24 rows: 16 + 8), copied the group's rows are one call of whole tiles
  // (in-process A/B, Intel Xeon with AMX: 32/8 D64 S=512 +0-1%, D128 S=512 +1%, D128 S=2048 +5%; MHA unchanged).
  const bool q_in_place = kMatrix && p.head_dim == dp && (group == 1 || p.products != Products::kInputTypeAmx);
  // Query rows of one head sit a whole token apart (BSND), which the hardware prefetcher does not follow: all the
  // block's rows are prefetched into L2 first, like K and V (see prefetch_keys). In-process A/B, Zen 4, causal, read in
  // place (bf16): MHA D64 S=512 +4%, D128 +1.4%, GQA 32/8 D64 +1.4%, MHA D64 S=2048 +1.6%; copied (fp16), against
  // PREFETCHT0 eight rows ahead: MHA S=512 +1.4-1.8%.
  phases::Lap lap;
  if (kMatrix && p.products == Products::kInputTypeAmx) amx::begin();
  const int64_t row_bytes = p.head_dim * element_bytes(p.type);
  for (int64_t r = 0; r < rows; ++r) prefetch_row(query_row(r), row_bytes);
  for (int64_t r = 0; r < padded_rows; ++r) {
    const int64_t pos = first + r / group;
    int64_t lo = 0, hi = 0;
    if (r < rows) {
      lo = band.row_lo(pos);
      hi = band.row_hi(pos);
    }
    if (!q_in_place) {
      for (int64_t d = 0; d < dp; d += 16) {  // padding rows are 0
        const __mmask16 m = r < rows ? tail_mask(p.head_dim - d) : __mmask16(0);
        const char* src = r < rows ? at_element(query_row(r), p.type, d) : nullptr;
        if constexpr (kMatrix) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.q16 + r * dp + d), _mm256_maskz_loadu_epi16(m, src));
        } else {  // scaled here once (the 16-bit path scales its fp32 scores instead)
          _mm512_storeu_ps(s.q + r * dp + d, _mm512_mul_ps(load16(src, p.type, m), score_scale));
        }
      }
    }
    if (lo >= hi) lo = hi = 0;  // an empty row
    s.lo[r] = lo;
    s.hi[r] = hi;
    if (lo < hi) {
      union_lo = std::min(union_lo, lo);
      union_hi = std::max(union_hi, hi);
    }
    s.row_max[r] = -kInf;
    s.row_sum[r] = 0.0f;
    if constexpr (!kMatrix) {  // the 16-bit path's first P V writes acc without reading it
      for (int64_t d = 0; d < dp; d += 16) _mm512_storeu_ps(s.acc + r * dp + d, _mm512_setzero_ps());
    }
  }
  bool acc_written = !kMatrix;
  auto zero_acc = [&] {
    for (int64_t i = 0; i < padded_rows * dp; i += 16) _mm512_storeu_ps(s.acc + i, _mm512_setzero_ps());
    acc_written = true;
  };
  const __m512 neg_inf = _mm512_set1_ps(-kInf);
  // Rows are taken in groups that share a column range per key block: register tiles in fp32, chunks of positions
  // in 16 bits (a product call each where the ranges differ).
  const int64_t chunk_positions = p.products == Products::kInputTypeTiles ? kTileChunkPositions
                                  : p.products == Products::kInputTypeAmx ? kAmxChunkPositions
                                                                          : kMatrixChunkPositions;
  const int64_t group_rows = !kMatrix ? kRowTile : chunk_positions * group;
  const int64_t tiles = (padded_rows + group_rows - 1) / group_rows;
  lap.to(phases::kQuery);
  for (int64_t block_start = union_hi ? union_lo / kKeyBlock * kKeyBlock : 0; block_start < union_hi;
       block_start += kKeyBlock) {
    // Columns of this block any row of a group keeps: [col_lo, col_hi), block-relative; empty when lo >= hi.
    int64_t block_lo = kKeyBlock, block_hi = 0;  // the same over all groups, in whole 16-key tiles
    bool uniform = true;  // every group keeps columns, in the same 16-key tiles
    for (int64_t t = 0; t < tiles; ++t) {
      int64_t col_lo = kKeyBlock, col_hi = 0;
      for (int64_t r = t * group_rows; r < std::min((t + 1) * group_rows, padded_rows); ++r) {
        const int64_t lo = std::max(s.lo[r] - block_start, int64_t(0));
        const int64_t hi = std::min(s.hi[r] - block_start, int64_t(kKeyBlock));
        if (lo < hi) {
          col_lo = std::min(col_lo, lo);
          col_hi = std::max(col_hi, hi);
        }
      }
      s.tile_lo[t] = col_lo;
      s.tile_hi[t] = col_hi;
      uniform = uniform && col_lo < col_hi && (t == 0 || (s.tile_lo[0] / 16 == col_lo / 16 &&
                                                          (s.tile_hi[0] + 15) / 16 == (col_hi + 15) / 16));
      if (col_lo < col_hi) {
        block_lo = std::min(block_lo, col_lo / 16 * 16);
        block_hi = std::max(block_hi, (col_hi + 15) / 16 * 16);
      }
    }
    if (block_lo >= block_hi) continue;
    // The 16-bit products of one group of rows, or of all rows where every group keeps the same columns. Blocks on
    // a causal diagonal differ: one product over all rows there computes the triangle above the diagonal too. MHA
    // blocks hold 96 positions. With oneDNN's brgemm, split in two: bf16 causal S=512 5-6% faster, S=1024-2048 ~2%
    // (AMD EPYC Zen 4, A/B); smaller chunks cost more in calls than they save there (16 positions: no gain), and GQA
    // blocks (96 / group positions) stay whole. The register tiles take chunks of 16 positions (in-process A/B
    // against 48, Zen 4: bf16 causal S=512 MHA D64 +3%, D128 +3%, GQA 32/8 D64 +1%; S=1024 +1%; 12, 18, 24 and 6
    // positions 1-3% slower than 16).
    auto for_each_group = [&](auto&& work) {
      if (uniform) return work(int64_t(0), padded_rows, block_lo, block_hi);
      for (int64_t t = 0; t < tiles; ++t) {
        if (s.tile_lo[t] >= s.tile_hi[t]) continue;
        work(t * group_rows, std::min((t + 1) * group_rows, padded_rows), s.tile_lo[t] / 16 * 16,
             (s.tile_hi[t] + 15) / 16 * 16);
      }
    };
    if constexpr (kMatrix) {
      // [group rows x dp] Q times K^T's [dp x group columns].
      const uint16_t* kt = static_cast<const uint16_t*>(key_t) + (block_start / kKeyBlock) * dp * kKeyBlock;
      for_each_group([&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
        if (!q_in_place) {
          products_16bit(p, r1 - r0, c1 - c0, dp, dp, kKeyBlock, kKeyBlock, false, nullptr, s.q16 + r0 * dp,
                         kt + 2 * c0, s.scores + r0 * kKeyBlock + c0);
          return;
        }
        for (int64_t h = 0; h < group; ++h) {  // head h's rows: positions at Q's seq stride, every group-th score row
          products_16bit(p, (r1 - r0) / group, c1 - c0, dp, p.qs.seq, kKeyBlock, group * kKeyBlock, false, nullptr,
                         reinterpret_cast<const uint16_t*>(query_row(r0 + h)), kt + 2 * c0,
                         s.scores + (r0 + h) * kKeyBlock + c0);
        }
      });
    } else {
      // Scores, one 64-key panel of K at a time so the panel stays in L1 across all row tiles.
      const float* kt = static_cast<const float*>(key_t) + (block_start / kKeyBlock) * dp * kKeyBlock;
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
    }
    lap.to(phases::kScores);
    // Online softmax: the weights of the kept columns, 0 for the rest of the columns the products below read (the
    // row's group's range in whole 16-key tiles, which is the block's where the groups are uniform; in 16 bits
    // written in the input dtype). Rows of a group that keeps nothing here are read by no product. Rows go through
    // softmax_rows_finite 16 at a time; softmax_row is the general path of the rows it leaves: scores scaled in
    // place, NaN and inf as in the reference's softmax.
    auto softmax_row = [&](int64_t r, int64_t lo, int64_t hi, int64_t score_lo, int64_t score_hi) {
      float* row = s.scores + r * kKeyBlock;
      uint16_t* probs = s.probs16 + r * kKeyBlock;
      __m512 vmax = neg_inf;
      __mmask16 nan = 0;
      for (int64_t c = lo; c < hi; c += 16) {
        const __mmask16 m = tail_mask(hi - c);
        __m512 x = _mm512_mask_loadu_ps(neg_inf, m, row + c);
        if constexpr (kMatrix) {  // scaled in place: x - max below must be <= 0 exactly, which a product the
          // compiler may fuse into that subtraction (GCC contracts vector a * b - c) would not be
          x = _mm512_mask_mul_ps(neg_inf, m, x, score_scale);
          _mm512_mask_storeu_ps(row + c, m, x);
        }
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, x);
      }
      const float old_max = s.row_max[r], block_max = _mm512_reduce_max_ps(vmax);
      // A NaN or +inf kept score makes the row NaN, as softmax does (exp(inf - inf)); NaN is sticky in std::max's
      // first argument and read at the end of the row.
      const float new_max = nan || block_max == kInf ? std::numeric_limits<float>::quiet_NaN()
                                                     : std::max(old_max, block_max);
      const __m512 shift = _mm512_set1_ps(new_max);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t c = score_lo; c < score_hi; c += 16) {
        __m512 e = _mm512_maskz_mov_ps(columns_within(c, lo, hi),
                                       exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + c), shift), kExp2Float32));
        if constexpr (kMatrix) {  // the sum takes the weights P V uses: rounded to the input dtype
          const __m256i narrow = narrow16(e, p.type);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + c), narrow);
          e = widen_half(_mm512_cvtepu16_epi32(narrow), false, p.type);
        } else {
          _mm512_storeu_ps(row + c, e);
        }
        vsum = _mm512_add_ps(vsum, e);
      }
      s.alpha[r] = old_max == -kInf ? 0.0f : std::exp2(old_max - new_max);  // 0 until a finite score is seen
      s.row_sum[r] = s.row_sum[r] * s.alpha[r] + _mm512_reduce_add_ps(vsum);
      s.row_max[r] = new_max;
    };
    for (int64_t r0 = 0; r0 < padded_rows; r0 += 16) {
      RowColumns columns;
      __mmask16 kept = 0;  // rows keeping a column of this block
      for (int i = 0; i < 16 && r0 + i < padded_rows; ++i) {
        const int64_t r = r0 + i;
        const int64_t t = r / group_rows;
        if (s.tile_lo[t] >= s.tile_hi[t]) continue;
        const int64_t score_lo = s.tile_lo[t] / 16 * 16;
        const int64_t score_hi = (s.tile_hi[t] + 15) / 16 * 16;
        const int64_t lo = std::max(s.lo[r] - block_start, int64_t(0));
        const int64_t hi = std::min(s.hi[r] - block_start, int64_t(kKeyBlock));
        if (lo >= hi) {  // nothing kept in this block: zero weights, state unchanged
          for (int64_t c = score_lo; c < score_hi; c += 16) {
            if constexpr (kMatrix) {
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.probs16 + r * kKeyBlock + c), _mm256_setzero_si256());
            } else {
              _mm512_storeu_ps(s.scores + r * kKeyBlock + c, _mm512_setzero_ps());
            }
          }
          s.alpha[r] = 1.0f;
          continue;
        }
        columns.lo[i] = lo;
        columns.hi[i] = hi;
        columns.score_lo[i] = score_lo;
        columns.score_hi[i] = score_hi;
        kept |= __mmask16(1u << i);
      }
      float* scores = s.scores + r0 * kKeyBlock;
      __mmask16 done = 0;
      if constexpr (kMatrix) {
        if (p.score_scale > 0.0f && kept) {
          const auto softmax = p.type == ElementType::kFloat16 ? softmax_rows_finite<WeightFormat::kFloat16>
                               : p.bf16_instructions ? softmax_rows_finite<WeightFormat::kBFloat16Instruction>
                                                     : softmax_rows_finite<WeightFormat::kBFloat16>;
          done = softmax(scores, s.probs16 + r0 * kKeyBlock, kept, columns, p.score_scale, s.row_max + r0,
                         s.row_sum + r0, s.alpha + r0);
        }
      } else if (kept) {
        done = softmax_rows_finite<WeightFormat::kFloat32>(scores, scores, kept, columns, 1.0f, s.row_max + r0,
                                                           s.row_sum + r0, s.alpha + r0);
      }
      for (int i = 0; i < 16; ++i) {
        if (((kept & ~done) >> i) & 1) {
          softmax_row(r0 + i, columns.lo[i], columns.hi[i], columns.score_lo[i], columns.score_hi[i]);
        }
      }
    }
    lap.to(phases::kSoftmax);
    bool nonfinite_values = false;
    for (int64_t tile = block_start + block_lo; tile < block_start + block_hi; tile += 16) {
      nonfinite_values |= nonfinite_tiles[tile / 16] != 0;
    }
    if (nonfinite_values) {
      // A NaN or +-inf value in the block: each row sums only the keys it keeps (a product over a masked key would
      // give 0 x inf = NaN, and what a row does not keep is never read). Rare, so simple.
      if (!acc_written) zero_acc();
      for (int64_t r = 0; r < padded_rows; ++r) {
        const int64_t lo = std::max(s.lo[r] - block_start, int64_t(0));
        const int64_t hi = std::min(s.hi[r] - block_start, int64_t(kKeyBlock));
        if (lo >= hi) continue;  // nothing kept in this block: acc unchanged
        float* acc = s.acc + r * dp;
        for (int64_t d = 0; d < dp; ++d) acc[d] *= s.alpha[r];
        for (int64_t c = lo; c < hi; ++c) {
          const int64_t key = block_start + c;
          if constexpr (kMatrix) {
            const float w = widen_scalar(s.probs16[r * kKeyBlock + c], p.type);
            const uint16_t* pair = static_cast<const uint16_t*>(value) + key / 2 * dp * 2 + key % 2;
            for (int64_t d = 0; d < dp; ++d) acc[d] += w * widen_scalar(pair[2 * d], p.type);
          } else {
            const float w = s.scores[r * kKeyBlock + c];
            const float* v = static_cast<const float*>(value) + key * dp;
            for (int64_t d = 0; d < dp; ++d) acc[d] += w * v[d];
          }
        }
      }
    } else if constexpr (kMatrix) {
      // acc = alpha * acc + P V: one accumulating product per group, which rescales acc first; the first block's
      // product writes acc where it covers every row (every row's acc is 0 before it, and a row with no kept key has
      // P = 0).
      if (!acc_written && !uniform) zero_acc();
      const uint16_t* values = static_cast<const uint16_t*>(value) + block_start * dp;
      for_each_group([&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
        products_16bit(p, r1 - r0, dp, c1 - c0, kKeyBlock, dp, dp, acc_written, s.alpha + r0,
                       s.probs16 + r0 * kKeyBlock + c0, values + c0 * dp, s.acc + r0 * dp);
      });
      acc_written = true;
    } else {
      // acc = alpha * acc + P V, one 64-wide panel of V at a time (L1-resident across the row tiles).
      const float* vb = static_cast<const float*>(value) + block_start * dp;
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
    lap.to(phases::kValues);
  }
  if (kMatrix && p.products == Products::kInputTypeOneDNN) at::native::cpublas::brgemm_release();
  if (kMatrix && p.products == Products::kInputTypeAmx) amx::end();
  if (!acc_written) zero_acc();  // no key block: every row is empty
  lap.to(phases::kValues);
  auto out_row = [&](int64_t r) {
    const int64_t pos = first + r / group;
    const int64_t head = kv_head * group + r % group;
    const int64_t out_pos = p.out_starts ? p.out_starts[batch] + pos : pos;
    const int64_t out_batch = p.out_starts ? 0 : batch;
    return at_element(p.out, p.type, out_batch * p.os.batch + head * p.os.head + out_pos * p.os.seq);
  };
  // Output rows sit a token apart (a page apart at 32 heads x D64 16-bit): a store first reads its line (from memory
  // where the output is cold, as after a layer's weights streamed through the cache), and a store waiting on its line
  // holds back the stores behind it. Asking for the lines kOutputRowsAhead rows ahead overlaps those reads; further
  // ahead, page-apart rows would outnumber the 8 ways of the L1 sets they share. In-process A/Bs (a run-time switch;
  // benchmarks/kernel_performance.md), Zen 4, causal S=512, five runs (one into a warm output; medians): bf16 MHA D64
  // -0.2 to +4.0% (+1.5%), GQA 32/8 D64 -0.4 to +2.2% (+1.7%), 9/3 D64 -0.6 to +4.1% (+0.8%), MHA D128 -0.6 to +1.5%
  // (+0.1%); fp16 +0.3-1%; S=2048 0%: a small gain, in this machine's noise run by run. (Skipping the read with
  // non-temporal stores moves it to the layer that reads the output next: benchmarks/kernel_performance.md.)
  constexpr int64_t kOutputRowsAhead = 6;
  const int64_t out_bytes = p.head_dim * element_bytes(p.type);
  for (int64_t r = 0; r < std::min(kOutputRowsAhead, rows); ++r) prefetch_for_write(out_row(r), out_bytes);
  for (int64_t r = 0; r < rows; ++r) {
    const char* orow = out_row(r);
    if (r + kOutputRowsAhead < rows) prefetch_for_write(out_row(r + kOutputRowsAhead), out_bytes);
    float inv = s.row_sum[r] > 0.0f ? 1.0f / s.row_sum[r] : 0.0f;  // rows with no kept key are 0
    // NaN or +inf among a row's kept scores, or all of them -inf: NaN, as in the reference's softmax.
    if (s.lo[r] < s.hi[r] && !(s.row_max[r] > -kInf)) inv = std::numeric_limits<float>::quiet_NaN();
    const __m512 scale_row = _mm512_set1_ps(inv);
    for (int64_t d = 0; d < p.head_dim; d += 16) {
      store16(const_cast<char*>(at_element(orow, p.type, d)), p.type,
              _mm512_mul_ps(_mm512_loadu_ps(s.acc + r * dp + d), scale_row), tail_mask(p.head_dim - d));
    }
  }
  lap.to(phases::kOutput);
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

constexpr size_t kHugePage = size_t(2) << 20;

// Asks for huge pages behind the whole 2 MiB pages of [ptr, ptr + bytes) (advisory: ignored where unsupported).
void advise_huge_pages(void* ptr, size_t bytes) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t first = (start + kHugePage - 1) / kHugePage * kHugePage;
  const uintptr_t last = (start + bytes) / kHugePage * kHugePage;
  if (first < last) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
}

// The fp32 K/V copies, kept per calling thread between calls: a fresh multi-MB buffer each call costs a page
// fault per 4 KiB (measured: MHA S=512 lost a fifth of its speed to them). Huge pages where the kernel allows.
float* kv_scratch(int64_t floats) {
  thread_local Buffer buffer;
  thread_local int64_t capacity = 0;
  if (floats > capacity) {
    buffer.reset();
    const size_t bytes = (static_cast<size_t>(floats) * sizeof(float) + kHugePage - 1) / kHugePage * kHugePage;
    auto* ptr = static_cast<float*>(std::aligned_alloc(kHugePage, bytes));
    TORCH_CHECK(ptr != nullptr, "vllm_pfa native kernel: out of memory for ", bytes, " bytes of scratch");
    advise_huge_pages(ptr, bytes);
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
    floats = allocate(4 * matrix + 3 * rows);  // q, scores, acc, and the two 16-bit matrices in one
    bounds.assign(3 * rows, 0);
    float* f = floats.get();
    auto* halves = reinterpret_cast<uint16_t*>(f + 3 * matrix);
    scratch = {f, halves, f + matrix, halves + matrix, f + 2 * matrix, f + 4 * matrix, f + 4 * matrix + rows,
               f + 4 * matrix + 2 * rows, bounds.data(), bounds.data() + rows, bounds.data() + 2 * rows,
               bounds.data() + 2 * rows + rows / 2};
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

// Checks one [B, N, S, D] argument. A head dim of 1 may carry any stride (torch calls such a tensor contiguous).
Strides strides_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "vllm_pfa native kernel: ", name, " must be [B, N, S, D], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "vllm_pfa native kernel: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "vllm_pfa native kernel: ", name,
              " must have a contiguous D (head) axis, got strides ", t.strides());
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// Whether oneDNN has 16-bit micro-kernels for this dtype on this CPU that take B in the VNNI pairs this kernel packs
// (AVX512-BF16 and AMX for bf16; AMX-FP16 for fp16): asked of the library itself, once per dtype, with a tiny product
// whose result is checked. It refuses to generate a kernel where the instructions are missing, and for fp16 on a CPU
// with AVX512-FP16 but no AMX-FP16 it generates one that reads B unpacked (a plain product, measured wrong here).
bool input_type_products_supported(ElementType type) {
  auto probe = [](auto zero) {
    using T = decltype(zero);
    try {
      T a[2] = {T(1.0f), T(2.0f)}, b[2 * 16];
      for (int n = 0; n < 16; ++n) {  // VNNI pairs: b[2n + k] is B[k][n]; B[0][n] = n, B[1][n] = 1
        b[2 * n] = T(static_cast<float>(n));
        b[2 * n + 1] = T(1.0f);
      }
      float c[16];
      at::native::cpublas::brgemm(1, 16, 2, 2, 16, 16, false, a, b, c);
      at::native::cpublas::brgemm_release();
      for (int n = 0; n < 16; ++n) {
        if (c[n] != static_cast<float>(n + 2)) return false;  // A B = 1 * n + 2 * 1
      }
      return true;
    } catch (const std::exception&) {
      return false;
    }
  };
  static const bool bf16 = probe(at::BFloat16(0.0f)), fp16 = probe(at::Half(0.0f));
  return type == ElementType::kBFloat16 ? bf16 : type == ElementType::kFloat16 && fp16;
}

// The 16-bit instructions beyond cpu_supported's, read from CPUID: __builtin_cpu_supports knows AVX512-BF16 only from
// GCC 10 and AMX-BF16 from GCC 11, and torch's at::cpu helpers for them changed names between the torch releases the
// extension is built against. AMX also needs the Linux kernel's permission for its tile state, which
// at::cpu::init_amx (the same in those releases) requests, as oneDNN would before its first AMX kernel.
struct MatrixFeatures {
  bool avx512_bf16, amx_bf16;
};

const MatrixFeatures& matrix_features() {
  static const MatrixFeatures features = [] {
    unsigned int max_subleaf = 0, ebx = 0, ecx = 0, leaf7_edx = 0, leaf7_1_eax = 0;
    if (!cpu_supported() || !__get_cpuid_count(7, 0, &max_subleaf, &ebx, &ecx, &leaf7_edx)) {
      return MatrixFeatures{false, false};
    }
    unsigned int unused_ebx = 0, unused_ecx = 0, unused_edx = 0;
    if (max_subleaf >= 1) __get_cpuid_count(7, 1, &leaf7_1_eax, &unused_ebx, &unused_ecx, &unused_edx);
    const bool amx_bf16 = ((leaf7_edx >> 22) & 1) != 0;  // CPUID.(7,0):EDX[22] AMX-BF16
    return MatrixFeatures{((leaf7_1_eax >> 5) & 1) != 0,   // CPUID.(7,1):EAX[5] AVX512-BF16
                          amx_bf16 && at::cpu::init_amx()};
  }();
  return features;
}

// The products route: "auto" and "input_dtype" take the 16-bit instructions' fastest route here (bf16: the register
// tiles where the CPU has AVX512-BF16 and no AMX, whose oneDNN kernels are several times faster; else oneDNN's
// brgemm); "input_dtype_onednn" takes brgemm wherever it runs (tests compare both routes).
Products parse_products(const std::string& products, ElementType type) {
  const bool input_type_supported = cpu_supported() && input_type_products_supported(type);
  if (products == "auto" && !input_type_supported) return Products::kFloat32;
  if (products == "fp32") return Products::kFloat32;
  TORCH_CHECK(products == "auto" || ((products == "input_dtype" || products == "input_dtype_onednn" ||
                                      products == "input_dtype_emulated") && type != ElementType::kFloat32),
              "vllm_pfa native kernel: products must be auto, fp32, input_dtype, input_dtype_onednn or "
              "input_dtype_emulated (the last three for 16-bit inputs), got ", products);
  if (products == "input_dtype_emulated") return Products::kInputTypeEmulated;
  TORCH_CHECK(input_type_supported,
              "vllm_pfa native kernel: this CPU has no 16-bit matrix instructions for this dtype");
  if (products == "input_dtype_onednn" || type != ElementType::kBFloat16) return Products::kInputTypeOneDNN;
  if (matrix_features().amx_bf16) return Products::kInputTypeAmx;
  return matrix_features().avx512_bf16 ? Products::kInputTypeTiles : Products::kInputTypeOneDNN;
}

}  // namespace

std::vector<std::pair<std::string, uint64_t>> phase_cycles(bool enable) {
  std::vector<std::pair<std::string, uint64_t>> cycles;
  for (int i = 0; i < phases::kCount; ++i) cycles.emplace_back(phases::kNames[i], phases::totals[i].exchange(0));
  phases::enabled.store(enable);
  return cycles;
}

std::string products_for(const at::Tensor& query) {
  return parse_products("auto", element_type(query)) == Products::kFloat32 ? "fp32" : "input_dtype";
}

std::string products_route(const at::Tensor& query, const std::string& products) {
  switch (parse_products(products, element_type(query))) {
    case Products::kFloat32: return "fp32";
    case Products::kInputTypeOneDNN: return "onednn";
    case Products::kInputTypeTiles: return "bf16_tiles";
    case Products::kInputTypeAmx: return "amx_tiles";
    case Products::kInputTypeEmulated: return "emulated";
  }
  return "fp32";  // unreachable: every route is named above
}

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
                       const std::vector<int64_t>& lo_offsets, const std::vector<int64_t>& hi_offsets, double scale,
                       const std::string& products, const std::vector<int64_t>& out_starts) {
  TORCH_CHECK(cpu_supported(), "vllm_pfa native kernel: this CPU lacks AVX-512");
  const Strides qs = strides_of(q, "query"), ks = strides_of(k, "key"), vs = strides_of(v, "value"),
                os = strides_of(out, "out");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "vllm_pfa native kernel: query, key, value and out must share one dtype");
  const ElementType type = element_type(q);
  const int64_t batches = q.size(0), heads = q.size(1), head_dim = q.size(3), kv_heads = k.size(1);
  TORCH_CHECK(k.size(0) == batches && v.size(0) == batches, "vllm_pfa native kernel: batch sizes differ");
  TORCH_CHECK(v.size(1) == kv_heads && kv_heads > 0 && heads % kv_heads == 0,
              "vllm_pfa native kernel: query heads must be a multiple of key/value heads");
  TORCH_CHECK(k.size(3) == head_dim && v.size(3) == head_dim && k.size(2) == v.size(2),
              "vllm_pfa native kernel: key and value shapes ", k.sizes(), " and ", v.sizes(), " do not match query ",
              q.sizes());
  const auto n = static_cast<size_t>(batches);
  TORCH_CHECK(head_dim <= 512, "vllm_pfa native kernel: head_dim > 512");
  TORCH_CHECK(q_lens.size() == n && kv_lens.size() == n && lo_offsets.size() == n && hi_offsets.size() == n,
              "vllm_pfa native kernel: one q_len, kv_len and band per batch");
  for (size_t b = 0; b < n; ++b) {
    TORCH_CHECK(0 <= q_lens[b] && q_lens[b] <= q.size(2) && 0 <= kv_lens[b] && kv_lens[b] <= k.size(2),
                "vllm_pfa native kernel: actual lengths (", q_lens[b], ", ", kv_lens[b], ") of batch ", b,
                " out of range");
  }
  if (out_starts.empty()) {
    TORCH_CHECK(out.sizes() == q.sizes(), "vllm_pfa native kernel: out shape ", out.sizes(), " differs from query's");
  } else {
    TORCH_CHECK(out_starts.size() == n && out.size(0) == 1 && out.size(1) == heads && out.size(3) == head_dim,
                "vllm_pfa native kernel: with out_starts, out must be [1, N, S, D] and one start per batch");
    for (size_t b = 0; b < n; ++b) {
      TORCH_CHECK(0 <= out_starts[b] && out_starts[b] + q_lens[b] <= out.size(2),
                  "vllm_pfa native kernel: out_starts[", b, "] = ", out_starts[b], " leaves rows outside out");
    }
  }
  Problem p{q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), qs, ks, vs, os, type,
            parse_products(products, type), out_starts.empty() ? nullptr : out_starts.data(), heads, kv_heads,
            head_dim, (head_dim + 15) / 16 * 16, static_cast<float>(scale * M_LOG2E), false};
  // The emulated products keep the AVX-512F rounding: on a CPU with AVX512-BF16 the tests compare both roundings.
  p.bf16_instructions = p.products != Products::kFloat32 && p.products != Products::kInputTypeEmulated &&
                        matrix_features().avx512_bf16;
  const bool matrix = p.products != Products::kFloat32;
  struct CallClock {  // the call's thread time, for the phase counters (charged when the call returns)
    phases::Lap lap;
    ~CallClock() {
      lap.call_ends([] { return at::get_num_threads(); });
    }
  } call_clock;
  const int64_t group = heads / kv_heads;
  const int64_t positions_per_block = std::max<int64_t>(1, kRowsPerQueryBlock / group);
  const int64_t scratch_rows = (positions_per_block * group + kRowTile - 1) / kRowTile * kRowTile;
  const int64_t dp = p.padded_dim;

  // Units of work: one (batch, kv head) each, with the 16-key tiles its rows can keep.
  struct Unit {
    int64_t batch, kv_head, key_start, key_end;  // key_end rounded up to a whole tile
    BatchBand band;
    void *key_t, *value;  // fp32, or 16-bit packed (matrix)
    uint8_t* nonfinite_tiles;  // per 16 keys: whether V holds a NaN or +-inf
  };
  std::vector<Unit> units;
  for (int64_t b = 0; b < batches; ++b) {
    // Offsets beyond +-(S1 + S2) all mean "unbounded": clamped so that i + offset cannot overflow.
    const int64_t bound = q.size(2) + k.size(2) + 1;
    const BatchBand band{q_lens[b], kv_lens[b], std::clamp(lo_offsets[b], -bound, bound),
                         std::clamp(hi_offsets[b], -bound, bound)};
    if (band.q_len == 0) continue;
    const int64_t key_end = std::max<int64_t>(0, band.row_hi(band.q_len - 1));
    const int64_t key_start = std::min(band.row_lo(0), key_end) / 16 * 16;
    for (int64_t h = 0; h < kv_heads; ++h) units.push_back({b, h, key_start, (key_end + 15) / 16 * 16, band});
  }
  int64_t tiles = 0;
  for (const Unit& unit : units) tiles += unit.key_end / 16;
  std::vector<uint8_t> nonfinite_tiles(tiles, 0);
  tiles = 0;
  for (Unit& unit : units) {
    unit.nonfinite_tiles = nonfinite_tiles.data() + tiles;
    tiles += unit.key_end / 16;
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
    const auto attend_block = matrix ? kernel::attend_block<true> : kernel::attend_block<false>;
    attend_block(p, unit.band, unit.batch, unit.kv_head, block.begin, block.end - block.begin, unit.key_t,
                 unit.value, unit.nonfinite_tiles, block_scratch(scratch_rows, dp));
  };
  auto convert = [&](const Unit& unit, int64_t begin, int64_t end) {
    if (matrix) {
      kernel::pack_keys(p, unit.batch, unit.kv_head, unit.band.kv_len, begin, end,
                        static_cast<uint16_t*>(unit.key_t), static_cast<uint16_t*>(unit.value), unit.nonfinite_tiles);
    } else {
      kernel::convert_keys(p, unit.batch, unit.kv_head, unit.band.kv_len, begin, end,
                           static_cast<float*>(unit.key_t), static_cast<float*>(unit.value), unit.nonfinite_tiles);
    }
  };
  // The floats one of K^T, V takes (16-bit elements: half as many).
  auto unit_floats = [&](const Unit& unit) { return (unit.key_end + kKeyBlock) * dp / (matrix ? 2 : 1); };

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
      float* kv_copy = kv_scratch(2 * unit_floats(unit));
      unit.key_t = kv_copy;
      unit.value = kv_copy + unit_floats(unit);
      phases::Lap lap;
      convert(unit, unit.key_start, unit.key_end);
      lap.to(phases::kPacking);
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
      unit.value = kv_copy + offsets[u - first_unit] + unit_floats(unit);
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
      phases::Lap lap;
      for (int64_t tile = item.begin; tile < item.end; tile += 16) {
        for (size_t u = item.unit; u < item.unit_end; ++u) convert(units[u], tile, tile + 16);
      }
      lap.to(phases::kPacking);
    });
    run_dynamic(blocks, [&](const Item& block) { attend(units[block.unit], block); });
    first_unit = end_unit;
  }
}

}  // namespace vllm_pfa
