// Per-phase time-stamp-counter cycles of the prefill kernel, switched on at run time (`_C.phase_cycles`,
// benchmarks/kernel_phases.py): where the time goes on a CPU that no profiler reaches (the lent AMX hosts have no
// perf), and how much of a call's thread time the phases leave to scheduling and waiting. Off, a lap costs one
// predictable branch; on, a time-stamp read per phase boundary and a few atomic adds per query block.
#pragma once

#include <x86intrin.h>

#include <array>
#include <atomic>
#include <cstdint>

namespace vllm_pfa::phases {

enum Phase : int {
  kPacking,  // K and V converted or packed for the products
  kQuery,    // a query block's setup: Q rows prefetched (or copied), per-row bounds and state
  kScores,   // Q K^T per key block, with the block's column ranges
  kSoftmax,  // the online softmax of the block's scores, the weights written for P V
  kValues,   // P V per key block (acc rescaled in it)
  kOutput,   // acc normalized and written to the output rows
  kCall,     // the calls' wall time times the threads: what the phases leave is scheduling, waiting and setup
  kCount
};

inline constexpr const char* kNames[kCount] = {"packing", "query", "scores", "softmax", "values", "output",
                                               "call_thread_cycles"};

inline std::atomic<bool> enabled{false};
inline std::array<std::atomic<uint64_t>, kCount> totals{};

// Charges the cycles since the previous mark to a phase; adds them to the totals when it goes out of scope.
class Lap {
 public:
  Lap() : on_(enabled.load(std::memory_order_relaxed)), mark_(on_ ? __rdtsc() : 0) {}
  Lap(const Lap&) = delete;
  Lap& operator=(const Lap&) = delete;
  ~Lap() {
    if (!on_) return;
    for (int i = 0; i < kCount; ++i) {
      if (cycles_[i] != 0) totals[i].fetch_add(cycles_[i], std::memory_order_relaxed);
    }
  }
  void to(Phase phase) {
    if (!on_) return;
    const uint64_t now = __rdtsc();
    cycles_[phase] += now - mark_;
    mark_ = now;
  }
  // The cycles since construction times the thread count, charged to kCall (the call's own clock). The count is a
  // callable, asked only when counting (an OpenMP query per call otherwise; this header does not include ATen).
  template <typename ThreadCount>
  void call_ends(ThreadCount threads) {
    if (on_) cycles_[kCall] += (__rdtsc() - mark_) * static_cast<uint64_t>(threads());
  }

 private:
  bool on_;
  uint64_t mark_;
  uint64_t cycles_[kCount] = {};
};

}  // namespace vllm_pfa::phases
