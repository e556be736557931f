#pragma once
// CUDA plumbing of the launchers (csrc/cuda/*.cpp) on torch's stable ABI: the device guard,
// torch's current stream and the check of a launch status.
#include <cuda_runtime_api.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/headeronly/util/shim_utils.h>

#include <stdexcept>

#include "common/stable.h"

namespace vqkernels {

using DeviceGuard = torch::stable::accelerator::DeviceGuard;  // DeviceGuard g(index)
using DeviceIndex = torch::stable::accelerator::DeviceIndex;

// VQK_CUDA_CHECK(status): throws std::runtime_error (RuntimeError in Python) naming the
// error when the cudaError_t status is not cudaSuccess.
#define VQK_CUDA_CHECK(status) ::vqkernels::cuda_check((status), __FILE__, __LINE__)
inline void cuda_check(cudaError_t status, const char* file, int line) {
  if (status != cudaSuccess) {
    throw std::runtime_error(
        str("CUDA error: ", cudaGetErrorString(status), " (", file, ":", line, ")"));
  }
}

// torch's current CUDA stream on a device, or on a tensor's device.
inline cudaStream_t current_stream(DeviceIndex device) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
}
inline cudaStream_t current_stream(const Tensor& t) {
  return current_stream(t.get_device_index());
}

}  // namespace vqkernels
