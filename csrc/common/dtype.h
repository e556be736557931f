#pragma once
// Element types crossing the boundary between the tensor-facing launchers and the
// raw-pointer CUDA kernels, which include no torch headers.

namespace vqkernels {

enum class DType { Float32, Float64, Float16, BFloat16, Int32, Int64 };

}  // namespace vqkernels
