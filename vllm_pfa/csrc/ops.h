// The functions of the vllm_pfa._C extension (bound to Python in bindings.cpp).
#pragma once

// Only the tensor type: torch/extension.h (pybind11, the whole torch API) is for bindings.cpp, and takes most
// of each file's compile time.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace vllm_pfa {

// True when this CPU has the instructions prefill_attention needs (AVX-512 F/BW/VL/DQ, FMA, F16C).
bool cpu_supported();

// Banded prefill attention into `out` (prefill_attention.cpp). products: "auto" (16-bit matrix products where this
// CPU has them for the dtype, else fp32), "fp32", "input_dtype", "input_dtype_onednn" (oneDNN's brgemm even where
// the kernel's own bf16 register or AMX tiles would run; tests), "input_dtype_emulated" (tests). out_starts
// (optional): out is [1, N, S, D] and batch b's query row i goes to out[0, :, out_starts[b] + i] (vLLM's token rows).
void prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                       const std::vector<int64_t>& q_lens, const std::vector<int64_t>& kv_lens,
                       const std::vector<int64_t>& lo_offsets, const std::vector<int64_t>& hi_offsets, double scale,
                       const std::string& products, const std::vector<int64_t>& out_starts);

// The operator's result on the native kernel (operator_call.cpp): query/key/value in `layout` (BSH, BSND, BNSD,
// BNSD_BSND; validated by the caller), the output in the layout's output form, rows past q_lens[b] zero; outputs of
// fresh_pages_from_bytes and more on padded_output's pages.
at::Tensor run_operator(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                        const std::string& layout, int64_t num_heads, int64_t num_kv_heads,
                        const std::vector<int64_t>& q_lens, const std::vector<int64_t>& kv_lens,
                        const std::vector<int64_t>& lo_offsets, const std::vector<int64_t>& hi_offsets, double scale,
                        const std::string& products, int64_t fresh_pages_from_bytes);

// The time-stamp-counter cycles each phase of prefill_attention took since the previous call (summed over threads;
// phase_cycles.h names them, in its order), then counting switched on or off for the calls that follow.
std::vector<std::pair<std::string, uint64_t>> phase_cycles(bool enable);

// The products "auto" picks for a query of this dtype on this CPU: "input_dtype" or "fp32".
std::string products_for(const at::Tensor& query);

// The route prefill_attention's products take for this query dtype and `products` argument on this CPU: "fp32",
// "onednn" (PyTorch's brgemm), "bf16_tiles" (the kernel's own AVX512-BF16 register tiles), "amx_tiles" (its own AMX
// tiles) or "emulated".
std::string products_route(const at::Tensor& query, const std::string& products);

// The operator's padded output: a new contiguous CPU tensor of sizes [B, S, N, D] (seq_axis 1) or [B, N, S, D]
// (seq_axis 2) on memory mapped for it, which reads as zeros until written (rows past lengths[b] need no fill), the
// rows below lengths[b] faulted in before the kernel writes them (output_memory.cpp).
at::Tensor padded_output(const std::vector<int64_t>& sizes, at::ScalarType dtype, int64_t seq_axis,
                         const std::vector<int64_t>& lengths);

// The first seq_len tokens of a request's paged K/V into dense [tokens, kv_heads, head] outputs (paged_kv_gather.cpp).
void gather_paged_kv(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_ids,
                     int64_t seq_len, at::Tensor& keys_out, at::Tensor& values_out, bool key_transposed,
                     bool value_transposed);

// The fp32 FMA rate of all threads over `seconds` of an AVX-512 FMA loop, in GFLOP/s (fma_peak.cpp).
double fp32_fma_peak_gflops(double seconds);

}  // namespace vllm_pfa
