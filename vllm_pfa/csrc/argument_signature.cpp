// The tensor part of the validation memo's key (vllm_pfa/ops/validation.py, validate_plain_call): the metadata read
// in one native call; as Python attribute reads over 3-9 tensors it would cost most of what the memo saves.
#include "argument_signature.h"

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

namespace vllm_pfa {

pybind11::object tensor_signature(const pybind11::sequence& objects) {
  std::vector<int64_t> words;
  words.reserve(objects.size() * 12);
  for (const pybind11::handle item : objects) {
    PyObject* object = item.ptr();
    if (object == Py_None) {
      words.push_back(-1);
      continue;
    }
    if (!THPVariable_CheckExact(object)) return pybind11::none();
    const at::Tensor& tensor = THPVariable_Unpack(object);
    if (tensor.layout() != at::kStrided || tensor.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
      return pybind11::none();
    }
    words.push_back(static_cast<int64_t>(tensor.scalar_type()));
    words.push_back(static_cast<int64_t>(tensor.device().type()));
    words.push_back(tensor.device().index());
    words.push_back(tensor.dim());
    words.insert(words.end(), tensor.sizes().begin(), tensor.sizes().end());
    words.insert(words.end(), tensor.strides().begin(), tensor.strides().end());
  }
  return pybind11::bytes(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t));
}

}  // namespace vllm_pfa
