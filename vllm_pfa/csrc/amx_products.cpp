// The kernel's bf16 products on AMX tiles, written here rather than taken from oneDNN's brgemm: PyTorch's brgemm looks
// its kernel up in a cache and may load a tile configuration on every call, and the kernel makes a call per (query
// block, key block) and product, alternating two shapes (Q K^T and P V). These calls take the tiles as they are.
// In-process against brgemm (the same build, its two routes alternating, 30 calls each; Intel Xeon with AMX, 2
// threads, bf16 causal): 32/8 D64 S=512 +9-11%, 32/32 D64 S=512 +14-19%, 9/3 D64 S=512 +3-7%, 32/8 D128 S=512 +0-6%,
// S=2048 +11-17%, 32/32 D128 S=2048 +15-19%. Running a product a step at a time between the softmax's rows instead
// (the tile unit beside the AVX-512 units) measured no gain (benchmarks/kernel_performance.md, "AMX").
//
// Tiles per 32 x 32 block of C (2 x 2): A rows 0-15 and 16-31 (tmm0, tmm1), B columns 0-15 and 16-31 (tmm2, tmm3), the
// four C tiles (tmm4-7); a step takes 32 of depth (a TDPBF16PS each). A depth that is not a multiple of 32 (the P V of
// a key range of 16 x odd keys, a head dim of 16 x odd) ends with a shorter step, for which a second layout takes
// 32 x 16 blocks of C: A (tmm0, tmm1), B (tmm2), the short step's B (tmm3) and A (tmm4, tmm5), C (tmm6, tmm7). Blocks
// with fewer than 32 rows configure the row tiles' height; a layout is loaded only when it changes.
#include "amx_products.h"

#include <ATen/native/CPUBlas.h>

#include <immintrin.h>

#include <algorithm>

namespace vllm_pfa::amx {

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row
  uint8_t rows[16] = {};
};

struct Layout {
  int rows0 = -1, rows1 = -1, short_depth = -1;  // rows of the two row tiles (0: unused), the last step's depth
  bool operator==(const Layout&) const = default;
};

thread_local Layout loaded;

void configure(const Layout& layout) {
  if (layout == loaded) return;
  TileConfig config;
  auto tile = [&](int index, int rows, int bytes) {
    if (rows > 0) {  // an unused tile has no rows and no columns
      config.rows[index] = static_cast<uint8_t>(rows);
      config.colsb[index] = static_cast<uint16_t>(bytes);
    }
  };
  tile(0, layout.rows0, 64);
  tile(1, layout.rows1, 64);
  tile(2, 16, 64);
  if (layout.short_depth == 0) {
    tile(3, 16, 64);
    tile(4, layout.rows0, 64);
    tile(5, layout.rows0, 64);
    tile(6, layout.rows1, 64);
    tile(7, layout.rows1, 64);
  } else {
    tile(3, layout.short_depth / 2, 64);
    tile(4, layout.rows0, layout.short_depth * 2);
    tile(5, layout.rows1, layout.short_depth * 2);
    tile(6, layout.rows0, 64);
    tile(7, layout.rows1, 64);
  }
  // Not _tile_loadconfig: GCC's version names only the configuration's first 8 bytes as the assembly's input, so the
  // stores of the rest could be dropped as dead; here the whole configuration is the input.
  __asm__ volatile("ldtilecfg %0" : : "m"(config));
  loaded = layout;
}

}  // namespace

void bf16_products(int64_t m_rows, int64_t n_cols, int64_t depth, int64_t lda, int64_t ldb, int64_t ldc,
                   bool accumulate, const uint16_t* a, const uint16_t* b, float* c) {
  const int64_t full_depth = depth / 32 * 32;
  const int short_depth = static_cast<int>(depth - full_depth);
  const int64_t a_stride = lda * 2, b_stride = ldb * 4, c_stride = ldc * 4;  // bytes; B's rows are pairs of depth
  for (int64_t r = 0; r < m_rows; r += 32) {
    const int rows0 = static_cast<int>(std::min<int64_t>(16, m_rows - r));
    const int rows1 = static_cast<int>(std::clamp<int64_t>(m_rows - r - 16, 0, 16));
    configure({rows0, rows1, short_depth});
    const uint16_t* a0 = a + r * lda;
    const uint16_t* a1 = a0 + 16 * lda;
    float* c0 = c + r * ldc;
    float* c1 = c0 + 16 * ldc;
    if (short_depth == 0) {
      for (int64_t col = 0; col < n_cols; col += 32) {
        const bool two = col + 16 < n_cols;
        if (accumulate) {
          _tile_loadd(4, c0 + col, c_stride);
          if (two) _tile_loadd(5, c0 + col + 16, c_stride);
          if (rows1) _tile_loadd(6, c1 + col, c_stride);
          if (rows1 && two) _tile_loadd(7, c1 + col + 16, c_stride);
        } else {
          _tile_zero(4);
          _tile_zero(5);
          if (rows1) {
            _tile_zero(6);
            _tile_zero(7);
          }
        }
        for (int64_t k = 0; k < depth; k += 32) {
          const uint16_t* bk = b + (k / 2 * ldb + col) * 2;
          _tile_loadd(2, bk, b_stride);
          if (two) _tile_loadd(3, bk + 32, b_stride);
          _tile_loadd(0, a0 + k, a_stride);
          _tile_dpbf16ps(4, 0, 2);
          if (two) _tile_dpbf16ps(5, 0, 3);
          if (rows1) {
            _tile_loadd(1, a1 + k, a_stride);
            _tile_dpbf16ps(6, 1, 2);
            if (two) _tile_dpbf16ps(7, 1, 3);
          }
        }
        _tile_stored(4, c0 + col, c_stride);
        if (two) _tile_stored(5, c0 + col + 16, c_stride);
        if (rows1) _tile_stored(6, c1 + col, c_stride);
        if (rows1 && two) _tile_stored(7, c1 + col + 16, c_stride);
      }
      continue;
    }
    // The second layout. Its steps repeat the first's with other tiles: GCC's tile intrinsics paste the tile number
    // into their assembly, so it must be a literal, not a parameter of a shared function.
    for (int64_t col = 0; col < n_cols; col += 16) {
      if (accumulate) {
        _tile_loadd(6, c0 + col, c_stride);
        if (rows1) _tile_loadd(7, c1 + col, c_stride);
      } else {
        _tile_zero(6);
        if (rows1) _tile_zero(7);
      }
      for (int64_t k = 0; k < full_depth; k += 32) {
        _tile_loadd(2, b + (k / 2 * ldb + col) * 2, b_stride);
        _tile_loadd(0, a0 + k, a_stride);
        _tile_dpbf16ps(6, 0, 2);
        if (rows1) {
          _tile_loadd(1, a1 + k, a_stride);
          _tile_dpbf16ps(7, 1, 2);
        }
      }
      _tile_loadd(3, b + (full_depth / 2 * ldb + col) * 2, b_stride);
      _tile_loadd(4, a0 + full_depth, a_stride);
      _tile_dpbf16ps(6, 4, 3);
      if (rows1) {
        _tile_loadd(5, a1 + full_depth, a_stride);
        _tile_dpbf16ps(7, 5, 3);
      }
      _tile_stored(6, c0 + col, c_stride);
      if (rows1) _tile_stored(7, c1 + col, c_stride);
    }
  }
}

void begin() {
  loaded = Layout{};
  at::native::cpublas::brgemm_release();
}

void end() {
  _tile_release();
  loaded = Layout{};
}

#pragma GCC pop_options

}  // namespace vllm_pfa::amx
