// The kernel's bf16 products on AMX tiles (amx_products.cpp). GCC's tile intrinsics are assembly without a memory
// clobber, so the compiler does not see their loads and stores: these functions stay in their own translation unit
// (not inlined), where a call orders the caller's accesses to A, B and C around them.
#pragma once

#include <cstdint>

namespace vllm_pfa::amx {

// C[M x N] = (accumulate ? C : 0) + A[M x K] B[K x N], fp32 C (row stride ldc): A bf16 row-major (row stride lda), B
// bf16 in VNNI pairs ([K / 2][ldb][2]); N a multiple of 16, K of 2. Only on a CPU with AMX-BF16 whose tile state the
// process may use (at::cpu::init_amx), between begin() and end() on the calling thread.
void bf16_products(int64_t m_rows, int64_t n_cols, int64_t depth, int64_t lda, int64_t ldb, int64_t ldc,
                   bool accumulate, const uint16_t* a, const uint16_t* b, float* c);

// Before a thread's first bf16_products: forgets the tile configuration it last loaded (someone else may have loaded
// theirs since) and has PyTorch's brgemm forget its own, so that its next call configures the tiles again.
void begin();

// After a thread's last bf16_products: releases the tile state (the thread's context switches save less).
void end();

}  // namespace vllm_pfa::amx
