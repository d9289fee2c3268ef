// Python bindings of vllm_pfa._C.
#include "argument_signature.h"
#include "ops.h"

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native CPU kernels of vllm_pfa: prefill attention (AVX-512, AMX, oneDNN brgemm) and the paged K/V gather";
  m.def("cpu_supported", &vllm_pfa::cpu_supported, "True when this CPU has the instructions prefill_attention needs");
  m.def("prefill_attention", &vllm_pfa::prefill_attention, "Banded causal prefill attention into `out`",
        pybind11::arg("query"), pybind11::arg("key"), pybind11::arg("value"), pybind11::arg("out"),
        pybind11::arg("q_lens"), pybind11::arg("kv_lens"), pybind11::arg("lo_offsets"),
        pybind11::arg("hi_offsets"), pybind11::arg("scale"), pybind11::arg("products") = "auto",
        pybind11::arg("out_starts") = std::vector<int64_t>{});
  m.def("run_operator", &vllm_pfa::run_operator,
        "The operator's result on the native kernel: the layout's views, the output (rows past q_lens zero), the kernel",
        pybind11::arg("query"), pybind11::arg("key"), pybind11::arg("value"), pybind11::arg("layout"),
        pybind11::arg("num_heads"), pybind11::arg("num_kv_heads"), pybind11::arg("q_lens"), pybind11::arg("kv_lens"),
        pybind11::arg("lo_offsets"), pybind11::arg("hi_offsets"), pybind11::arg("scale"), pybind11::arg("products"),
        pybind11::arg("fresh_pages_from_bytes"));
  m.def("tensor_signature", &vllm_pfa::tensor_signature,
        "bytes of each object's dtype, device, sizes and strides (None for None), or None where one is not a plain "
        "strided torch.Tensor: the tensor part of the operator's validation memo key", pybind11::arg("objects"));
  m.def("phase_cycles", &vllm_pfa::phase_cycles,
        "prefill_attention's time-stamp-counter cycles per phase since the previous call, (name, cycles) pairs summed "
        "over threads (call_thread_cycles: the calls' wall time times the threads), then counting switched on or off",
        pybind11::arg("enable"));
  m.def("products_for", &vllm_pfa::products_for,
        "How prefill_attention multiplies for a query of this dtype here: input_dtype (16-bit matrix "
        "instructions) or fp32", pybind11::arg("query"));
  m.def("products_route", &vllm_pfa::products_route,
        "The route of prefill_attention's products for this query dtype and products argument here: fp32, onednn, "
        "bf16_tiles, amx_tiles or emulated", pybind11::arg("query"), pybind11::arg("products") = "auto");
  m.def("padded_output", &vllm_pfa::padded_output,
        "The operator's padded output [B, S, N, D] (seq_axis 1) or [B, N, S, D] (seq_axis 2) on fresh pages: zeros "
        "until written, the rows below each batch's length faulted in", pybind11::arg("sizes"), pybind11::arg("dtype"),
        pybind11::arg("seq_axis"), pybind11::arg("lengths"));
  m.def("fp32_fma_peak_gflops", &vllm_pfa::fp32_fma_peak_gflops,
        "The fp32 FMA rate of all threads in an AVX-512 FMA loop (GFLOP/s): the benchmarks' fp32 peak line",
        pybind11::arg("seconds") = 0.5);
  m.def("gather_paged_kv", &vllm_pfa::gather_paged_kv,
        "A request's first seq_len keys/values from vLLM's CPU paged cache into dense outputs",
        pybind11::arg("key_cache"), pybind11::arg("value_cache"), pybind11::arg("block_ids"),
        pybind11::arg("seq_len"), pybind11::arg("keys_out"), pybind11::arg("values_out"),
        pybind11::arg("key_transposed"), pybind11::arg("value_transposed"));
}
