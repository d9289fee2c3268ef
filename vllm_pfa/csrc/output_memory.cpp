// The operator's large padded outputs on memory mapped for them (padded_output, ops.h).
//
// A padded batch's output rows past actual_seq_lengths must be 0. Under glibc, PyTorch's allocation of more than
// 32 MiB (malloc's largest mmap threshold) is a fresh mapping anyway, and every page of it faulted on its first
// write, the zero fill of the padding rows included. A mapping made here reads as zeros (anonymous memory), so the
// padding needs no fill and its whole pages are never touched, and the rows the kernel will write are faulted in by
// MADV_POPULATE_WRITE per MiB of rows, on all threads, before it starts, not a fault at a time inside its loops. bf16
// lengths 2048/1000/517/130 padded to 2048 (64 MiB, 36 of it padding; Intel Xeon, 2 threads): 62 ms a call with the
// zeros written, 55 ms without them, 50.5 ms with the rows populated by one thread, 47.7 by two (the kernel alone
// writing vLLM's reused token rows: 41-42).
// 4 KiB pages: huge pages were 5 ms faster in the median but, in a VM that hands freed memory back to its host, one
// call in tens took 0.2-0.5 s faulting them in again (benchmarks/kernel_performance.md, thirty-second session).
#include "ops.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <algorithm>
#include <utility>
#include <vector>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels refuse it (EINVAL) and the pages fault on first write
#endif

namespace vllm_pfa {
namespace {

constexpr uintptr_t kPage = 4096;
constexpr size_t kPopulateChunk = size_t(1) << 20;

struct Mapping {
  void* base;
  size_t bytes;
};

void unmap(void* context) {
  auto* mapping = static_cast<Mapping*>(context);
  munmap(mapping->base, mapping->bytes);
  delete mapping;
}

// Private anonymous mappings, one per storage; a storage it backs may be resized (the new mapping is then filled by
// PyTorch's copy, as any resize).
class FreshPagesAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (bytes == 0) return {nullptr, cpu};
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "vllm_pfa: out of memory mapping ", bytes, " bytes for an output");
    return {base, new Mapping{base, bytes}, &unmap, cpu};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

FreshPagesAllocator fresh_pages_allocator;

// Faults in [start, start + bytes) now (advisory: a kernel without MADV_POPULATE_WRITE, or short of memory, leaves
// the pages to fault on first write).
void populate(const char* start, size_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(start) / kPage * kPage;
  const uintptr_t end = reinterpret_cast<uintptr_t>(start) + bytes;
  if (bytes > 0) madvise(reinterpret_cast<void*>(first), end - first, MADV_POPULATE_WRITE);
}

}  // namespace

at::Tensor padded_output(const std::vector<int64_t>& sizes, at::ScalarType dtype, int64_t seq_axis,
                         const std::vector<int64_t>& lengths) {
  TORCH_CHECK(sizes.size() == 4 && (seq_axis == 1 || seq_axis == 2) && lengths.size() == size_t(sizes[0]),
              "padded_output: sizes [B, S, N, D] or [B, N, S, D], seq_axis 1 or 2, B lengths");
  at::Tensor out = at::detail::empty_generic(sizes, &fresh_pages_allocator,
                                             c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
  if (out.numel() == 0) return out;
  const auto* base = static_cast<const char*>(out.data_ptr());
  const int64_t item = out.element_size();
  // The runs of rows to populate (BSND: one per batch; BNSD: one per batch and head), cut into chunks the threads
  // share: page faults are taken in parallel.
  std::vector<std::pair<const char*, size_t>> chunks;
  const int64_t runs_per_batch = seq_axis == 1 ? 1 : sizes[1];
  for (int64_t b = 0; b < sizes[0]; ++b) {
    const int64_t rows = std::clamp<int64_t>(lengths[b], 0, sizes[seq_axis]);
    for (int64_t r = 0; r < runs_per_batch; ++r) {
      const char* start = base + (b * out.stride(0) + (seq_axis == 2 ? r * out.stride(1) : 0)) * item;
      const size_t bytes = size_t(rows * out.stride(seq_axis) * item);
      for (size_t done = 0; done < bytes; done += kPopulateChunk) {
        chunks.emplace_back(start + done, std::min(kPopulateChunk, bytes - done));
      }
    }
  }
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) populate(chunks[c].first, chunks[c].second);
  });
  return out;
}

}  // namespace vllm_pfa
