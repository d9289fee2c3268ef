// Transparent huge pages for memory the native code allocates (output_memory.cpp, the kernel's K/V scratch).
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>

namespace vllm_pfa {

constexpr size_t kHugePage = size_t(2) << 20;

// Asks for huge pages behind the whole 2 MiB pages of [ptr, ptr + bytes) (advisory: ignored where unsupported).
inline void advise_huge_pages(void* ptr, size_t bytes) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t first = (start + kHugePage - 1) / kHugePage * kHugePage;
  const uintptr_t last = (start + bytes) / kHugePage * kHugePage;
  if (first < last) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
}

}  // namespace vllm_pfa
