// The machine's fp32 FMA peak, measured: a reference line for the benchmarks (benchmarks/bench_op.py), so a kernel's
// rate is compared with what this CPU can do in the same run rather than with a figure from elsewhere.
//
// Written here rather than taken from a library: no maintained library exposes a peak probe, and a GEMM (oneDNN,
// MKL) measures its own blocking as well; the benchmark takes the higher of this loop and oneDNN's fp32 GEMM.

#include "ops.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <atomic>
#include <chrono>

namespace vllm_pfa {

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace {

// 16 independent accumulators: enough to cover the FMA latency on two FMA ports. Returns FMAs done.
int64_t fma_loop(int64_t iterations, float* sink) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 total = acc[0];
  for (int i = 1; i < 16; ++i) total = _mm512_add_ps(total, acc[i]);
  *sink = _mm512_reduce_add_ps(total);  // keeps the loop from being optimized away
  return iterations * 16 * 16;
}

}  // namespace
#pragma GCC pop_options

double fp32_fma_peak_gflops(double seconds) {
  TORCH_CHECK(cpu_supported(), "vllm_pfa: the FMA peak probe needs AVX-512");
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> fmas{0};
  float sink = 0.0f;
  fma_loop(1 << 16, &sink);  // warm-up: frequency ramp, AVX-512 license
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float local = 0.0f;
      int64_t done = 0;
      const auto until = start + std::chrono::duration<double>(seconds);
      while (std::chrono::steady_clock::now() < until) done += fma_loop(1 << 16, &local);
      fmas += done;
    }
  });
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return 2.0 * static_cast<double>(fmas.load()) / elapsed / 1e9;
}

}  // namespace vllm_pfa
