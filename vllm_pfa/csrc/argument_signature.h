// The operator's tensor arguments as a key for the Python validation's memo (argument_signature.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace vllm_pfa {

// bytes naming each object's dtype, device, sizes and strides (None as None), or None where an object is neither
// None nor a plain strided torch.Tensor (a subclass, symbolic sizes, another type): what argument validation reads
// of a tensor, so equal signatures validate alike.
pybind11::object tensor_signature(const pybind11::sequence& objects);

}  // namespace vllm_pfa
