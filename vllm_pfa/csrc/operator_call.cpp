// The operator's native route in one call from Python (run_operator, ops.h): the layout's [B, N, S, D] views, the
// output allocated in its final memory order (rows past actual_seq_lengths zero), the kernel. The same steps as
// Python calls were ~12 tensor calls, each through the argument parser and the dispatcher: ~35 us of a 0.46 ms
// call (fp32 9/3 heads D64 S=256, run between other kernels, when Python's code and objects are out of cache).
#include "ops.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace vllm_pfa {
namespace {

// A [B, N, S, D] view of a query/key/value given in `layout` (layout.py's to_bnsd).
at::Tensor to_bnsd(const at::Tensor& tensor, const std::string& layout, int64_t heads) {
  at::Tensor bnsd = tensor;
  if (layout == "BSH") {
    bnsd = tensor.view({tensor.size(0), tensor.size(1), heads, tensor.size(2) / heads}).transpose(1, 2);
  } else if (layout == "BSND") {
    bnsd = tensor.transpose(1, 2);
  }
  if (bnsd.size(3) == 1 && bnsd.stride(3) != 1) {  // torch leaves a size-1 axis's stride free; the kernel reads 1
    std::vector<int64_t> strides = bnsd.strides().vec();
    strides[3] = 1;
    bnsd = bnsd.as_strided(bnsd.sizes(), strides, bnsd.storage_offset());
  }
  return bnsd;
}

}  // namespace

at::Tensor run_operator(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                        const std::string& layout, int64_t num_heads, int64_t num_kv_heads,
                        const std::vector<int64_t>& q_lens, const std::vector<int64_t>& kv_lens,
                        const std::vector<int64_t>& lo_offsets, const std::vector<int64_t>& hi_offsets, double scale,
                        const std::string& products, int64_t fresh_pages_from_bytes) {
  TORCH_CHECK(layout == "BSH" || layout == "BSND" || layout == "BNSD" || layout == "BNSD_BSND",
              "run_operator: unknown layout ", layout);
  const int64_t dims = layout == "BSH" ? 3 : 4;
  TORCH_CHECK(query.dim() == dims && key.dim() == dims && value.dim() == dims && num_heads > 0 && num_kv_heads > 0,
              "run_operator: query, key and value must be ", dims, "-D for ", layout, " and the head counts positive");
  const at::Tensor q = to_bnsd(query, layout, num_heads);
  const int64_t batch = q.size(0), heads = q.size(1), seq = q.size(2), dim = q.size(3);
  TORCH_CHECK(q_lens.size() == size_t(batch), "run_operator: one query length per batch");
  const bool bnsd_out = layout == "BNSD";
  const std::vector<int64_t> sizes = bnsd_out ? std::vector<int64_t>{batch, heads, seq, dim}
                                              : std::vector<int64_t>{batch, seq, heads, dim};
  const bool fresh = batch * heads * seq * dim * int64_t(query.element_size()) >= fresh_pages_from_bytes;
  at::Tensor out = fresh ? padded_output(sizes, query.scalar_type(), bnsd_out ? 2 : 1, q_lens)
                         : at::empty(sizes, query.options());
  at::Tensor out_bnsd = bnsd_out ? out : out.transpose(1, 2);
  if (!fresh) {  // a fresh mapping's rows past the lengths read as 0 already
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t rows = std::clamp<int64_t>(q_lens[b], 0, seq);
      if (rows < seq) out_bnsd[b].narrow(1, rows, seq - rows).zero_();
    }
  }
  prefill_attention(q, to_bnsd(key, layout, num_kv_heads), to_bnsd(value, layout, num_kv_heads), out_bnsd, q_lens,
                    kv_lens, lo_offsets, hi_offsets, scale, products, {});
  return layout == "BSH" ? out.view({batch, seq, heads * dim}) : out;
}

}  // namespace vllm_pfa
