// Reading a request's context K/V back out of vLLM's CPU paged cache in one pass.
//
// A cache half is [num_blocks, kv_heads, block_size, head] as vLLM's CPU backend views it; inside a (block, head)
// the tokens are either rows ([block_size][head], "plain") or columns ([head][block_size], "transposed", vLLM's
// key layout for the vec ISAs). The output is token-major, [>= seq_len, kv_heads, head]. The torch equivalent
// takes three passes over the data (index_select, transpose, strided copy); this takes one, parallel over
// (block, head) pairs, transposing in registers (16- and 32-bit elements, head sizes of whole vectors) or else
// through L1-sized tiles.
#include "ops.h"
#include "transpose.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace vllm_pfa {
namespace {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
// A transposed 16-bit block ([head][block_size] per kv head) into token rows. 16 tokens x 32 dims at a time: each pair
// of dims' 16 tokens interleaved into 32-bit words (token t: dims d, d + 1), then one 16 x 16 transpose of those
// words makes each token's 32 dims one row. Against one 32-bit gather per 16 dims and two tokens (the tail's way
// here), Zen 4, bf16 keys transposed and values plain, warm: 8 kv heads x 128 dims, 1536 tokens in blocks of 128,
// 0.209 -> 0.103-0.109 ms (values alone 0.08); 3 x 64 (SmolLM2) 0.039 -> 0.022-0.025 ms; 3 x 64, blocks of 16,
// 4096 tokens 0.105 -> 0.057-0.072 ms; 16.8 MB (8 x 64, 8192 tokens), bound by memory: 1.22 -> 1.06-1.36 ms. Needs
// head % 32 == 0 and an even block_size.
void copy_transposed_16bit(const uint16_t* src, int64_t block_size, int64_t head, int64_t tokens, uint16_t* dst,
                           int64_t dst_token_stride) {
  alignas(64) uint16_t interleave[32], even[32], odd[32];
  for (int i = 0; i < 16; ++i) {
    interleave[2 * i] = static_cast<uint16_t>(i);
    interleave[2 * i + 1] = static_cast<uint16_t>(16 + i);
  }
  for (int i = 0; i < 32; ++i) even[i] = static_cast<uint16_t>(2 * i), odd[i] = static_cast<uint16_t>(2 * i + 1);
  const __m512i pairs = _mm512_load_si512(interleave);
  int64_t t = 0;
  for (; t + 16 <= tokens; t += 16) {
    for (int64_t d = 0; d < head; d += 32) {
      __m512i words[16];
      for (int i = 0; i < 16; ++i) {
        const uint16_t* dim = src + (d + 2 * i) * block_size + t;
        const __m512i both = _mm512_inserti64x4(
            _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dim))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dim + block_size)), 1);
        words[i] = _mm512_permutexvar_epi16(pairs, both);
      }
      transpose_16x16(words);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (t + i) * dst_token_stride + d, words[i]);
    }
  }
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(block_size * 2)));
  const __m512i pick_even = _mm512_load_si512(even), pick_odd = _mm512_load_si512(odd);
  for (; t + 2 <= tokens; t += 2) {
    for (int64_t d = 0; d < head; d += 32) {
      const char* base = reinterpret_cast<const char*>(src + d * block_size + t);
      const __m512i lo = _mm512_i32gather_epi32(rows, base, 1);
      const __m512i hi = _mm512_i32gather_epi32(rows, base + 16 * block_size * 2, 1);
      _mm512_storeu_si512(dst + t * dst_token_stride + d, _mm512_permutex2var_epi16(lo, pick_even, hi));
      _mm512_storeu_si512(dst + (t + 1) * dst_token_stride + d, _mm512_permutex2var_epi16(lo, pick_odd, hi));
    }
  }
  for (; t < tokens; ++t) {
    for (int64_t d = 0; d < head; ++d) dst[t * dst_token_stride + d] = src[d * block_size + t];
  }
}

// A transposed 32-bit block ([head][block_size] per kv head) into token rows: 16 tokens x 16 dims at a time, one
// register transpose each (the last tokens through masked loads). Against the element-wise tiles below (the only
// way before), Zen 4, fp32 SmolLM2 context (3 kv heads x 64 dims, 509 tokens in blocks of 128), both halves read as
// transposed blocks: 66 -> 19 us warm, 260 -> 101 us after a 64 MiB write (two plain halves: 16-19 / 80-100 us).
// Needs head % 16 == 0.
void copy_transposed_32bit(const uint32_t* src, int64_t block_size, int64_t head, int64_t tokens, uint32_t* dst,
                           int64_t dst_token_stride) {
  for (int64_t t = 0; t < tokens; t += 16) {
    const int64_t n = std::min<int64_t>(16, tokens - t);
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t d = 0; d < head; d += 16) {
      __m512i words[16];
      for (int i = 0; i < 16; ++i) words[i] = _mm512_maskz_loadu_epi32(m, src + (d + i) * block_size + t);
      transpose_16x16(words);
      for (int64_t i = 0; i < n; ++i) _mm512_storeu_si512(dst + (t + i) * dst_token_stride + d, words[i]);
    }
  }
}
#pragma GCC pop_options

template <typename Element>
void copy_block(const Element* src, int64_t block_size, int64_t head, int64_t tokens, bool transposed, Element* dst,
                int64_t dst_token_stride) {
  if (!transposed) {
    for (int64_t t = 0; t < tokens; ++t) {
      std::memcpy(dst + t * dst_token_stride, src + t * head, head * sizeof(Element));
    }
    return;
  }
  if constexpr (sizeof(Element) == 2) {
    if (head % 32 == 0 && block_size % 2 == 0 && cpu_supported()) {
      copy_transposed_16bit(src, block_size, head, tokens, dst, dst_token_stride);
      return;
    }
  }
  if constexpr (sizeof(Element) == 4) {
    if (head % 16 == 0 && cpu_supported()) {
      copy_transposed_32bit(src, block_size, head, tokens, dst, dst_token_stride);
      return;
    }
  }
  constexpr int64_t kTile = 32;  // 32 x 32 elements: both sides of a tile stay in L1
  for (int64_t t0 = 0; t0 < tokens; t0 += kTile) {
    const int64_t t1 = std::min(t0 + kTile, tokens);
    for (int64_t d0 = 0; d0 < head; d0 += kTile) {
      const int64_t d1 = std::min(d0 + kTile, head);
      for (int64_t t = t0; t < t1; ++t) {
        Element* row = dst + t * dst_token_stride;
        for (int64_t d = d0; d < d1; ++d) row[d] = src[d * block_size + t];
      }
    }
  }
}

template <typename Element>
void gather_half(const at::Tensor& cache, const int64_t* block_ids, int64_t seq_len, at::Tensor& out,
                 bool transposed) {
  const int64_t heads = cache.size(1), block_size = cache.size(2), head = cache.size(3);
  const int64_t blocks = (seq_len + block_size - 1) / block_size;
  const auto* base = static_cast<const Element*>(cache.data_ptr());
  auto* dst = static_cast<Element*>(out.data_ptr());
  const int64_t out_token = out.stride(0), out_head = out.stride(1);
  at::parallel_for(0, blocks * heads, 4, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item / heads, h = item % heads;
      const Element* src = base + block_ids[block] * cache.stride(0) + h * cache.stride(1);
      const int64_t tokens = std::min(block_size, seq_len - block * block_size);
      copy_block(src, block_size, head, tokens, transposed, dst + block * block_size * out_token + h * out_head,
                 out_token);
    }
  });
}

// A dimension of size 1 may carry any stride (torch calls such a tensor contiguous): only its element 0 is read.
bool dense(const at::Tensor& t, int64_t dim, int64_t stride) { return t.size(dim) <= 1 || t.stride(dim) == stride; }

void check_output(const at::Tensor& out, const at::Tensor& cache, int64_t seq_len, const char* name) {
  TORCH_CHECK(out.dim() == 3, "gather_paged_kv: ", name, " must be [tokens, kv_heads, head], got ", out.sizes());
  TORCH_CHECK(out.device().is_cpu(), "gather_paged_kv: ", name, " must be a CPU tensor");
  TORCH_CHECK(out.scalar_type() == cache.scalar_type(), "gather_paged_kv: ", name, " dtype ", out.scalar_type(),
              " differs from the cache's ", cache.scalar_type());
  TORCH_CHECK(out.size(0) >= seq_len && out.size(1) == cache.size(1) && out.size(2) == cache.size(3),
              "gather_paged_kv: ", name, " shape ", out.sizes(), " does not hold ", seq_len, " tokens of ",
              cache.size(1), " kv heads x ", cache.size(3));
  TORCH_CHECK(dense(out, 2, 1), "gather_paged_kv: ", name, " must have a contiguous last dimension");
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, "gather_paged_kv: ", name,
              " has overlapping elements (an expanded view)");
}

// Both caches before anything is read: the same [blocks, kv_heads, block_size, head] shape (the same block ids
// index both), one float or 16/8-bit dtype, on the CPU, each (block, head) a dense block_size x head matrix.
void check_caches(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  for (const auto* cache : {&key_cache, &value_cache}) {
    const char* name = cache == &key_cache ? "key_cache" : "value_cache";
    TORCH_CHECK(cache->dim() == 4, "gather_paged_kv: ", name, " must be [blocks, kv_heads, block_size, head], got ",
                cache->sizes());
    TORCH_CHECK(cache->device().is_cpu(), "gather_paged_kv: ", name, " must be a CPU tensor");
    TORCH_CHECK(dense(*cache, 3, 1) && dense(*cache, 2, cache->size(3)), "gather_paged_kv: ", name,
                " blocks must be dense (block_size x head per kv head), got strides ", cache->strides());
  }
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(), "gather_paged_kv: key_cache ", key_cache.sizes(),
              " and value_cache ", value_cache.sizes(), " differ in shape");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "gather_paged_kv: key_cache and value_cache "
              "dtypes differ");
}

void dispatch_half(const at::Tensor& cache, const int64_t* ids, int64_t seq_len, at::Tensor& out, bool transposed) {
  switch (cache.element_size()) {
    case 2: gather_half<uint16_t>(cache, ids, seq_len, out, transposed); break;
    case 4: gather_half<uint32_t>(cache, ids, seq_len, out, transposed); break;
    case 1: gather_half<uint8_t>(cache, ids, seq_len, out, transposed); break;
    default: TORCH_CHECK(false, "gather_paged_kv: unsupported element size ", cache.element_size());
  }
}

}  // namespace

void gather_paged_kv(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_ids,
                     int64_t seq_len, at::Tensor& keys_out, at::Tensor& values_out, bool key_transposed,
                     bool value_transposed) {
  check_caches(key_cache, value_cache);
  check_output(keys_out, key_cache, seq_len, "keys_out");
  check_output(values_out, value_cache, seq_len, "values_out");
  TORCH_CHECK(block_ids.scalar_type() == at::kLong && block_ids.dim() == 1 && block_ids.is_contiguous() &&
                  block_ids.device().is_cpu(),
              "gather_paged_kv: block_ids must be a contiguous int64 CPU vector");
  const int64_t block_size = key_cache.size(2);
  TORCH_CHECK(block_size > 0, "gather_paged_kv: the caches' block_size is 0");
  TORCH_CHECK(seq_len >= 0 && block_ids.size(0) * block_size >= seq_len, "gather_paged_kv: seq_len ", seq_len,
              " needs more blocks than the ", block_ids.size(0), " given");
  const int64_t* ids = block_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < (seq_len + block_size - 1) / block_size; ++i) {
    TORCH_CHECK(0 <= ids[i] && ids[i] < key_cache.size(0), "gather_paged_kv: block id ", ids[i],
                " out of range for ", key_cache.size(0), " blocks");
  }
  dispatch_half(key_cache, ids, seq_len, keys_out, key_transposed);
  dispatch_half(value_cache, ids, seq_len, values_out, value_transposed);
}

}  // namespace vllm_pfa
