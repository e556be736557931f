// The pybind11 module vqkernels._C: importing it registers the torch ops
// (csrc/op_registry.cpp is linked in) and exposes what was built.
#include <torch/extension.h>

#include "vqkernels.h"

#include "build_config.h"

// The torch this file was built against and the CUDA of its kernels ("" without),
// read from its bytes by vqkernels._ext before importing it: an extension built for
// another torch minor or CUDA major is not imported at all.
extern "C" __attribute__((used)) const char vqkernels_built_for_torch[] =
    "vqkernels-built-for-torch=" VQKERNELS_TORCH_VERSION;
extern "C" __attribute__((used)) const char vqkernels_built_with_cuda[] =
    "vqkernels-built-with-cuda=" VQKERNELS_CUDA_VERSION;

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = VQKERNELS_VERSION;
  info["torch_version"] = VQKERNELS_TORCH_VERSION;
  info["openmp"] = vqkernels::built_with_openmp();
  info["cuda"] = vqkernels::built_with_cuda();
  info["cuda_version"] = VQKERNELS_CUDA_VERSION;
  info["cuda_archs"] = VQKERNELS_CUDA_ARCHS;
  return info;
}

std::vector<int64_t> cuda_attention_head_dims() {
#ifdef VQKERNELS_WITH_CUDA
  return vqkernels::attention_head_dims_cuda();
#else
  return {};
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vqkernels compiled kernels (C++ CPU and CUDA); the ops live in torch.ops.vqkernels";
  m.def("build_info", &build_info, "What this extension was built with.");
  m.def("cuda_attention_head_dims", &cuda_attention_head_dims,
        "Head dims the CUDA attention kernel was compiled for (empty without CUDA kernels).");
}
