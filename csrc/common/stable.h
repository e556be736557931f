#pragma once
// The part of LibTorch's stable ABI (torch/csrc/stable, torch/headeronly) that the
// launchers use, and the few helpers they share on top of it. Built with
// TORCH_TARGET_VERSION (setup.py, CMakeLists.txt), one binary loads in every torch
// from that version on: nothing here may touch ATen or c10 directly.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace vqkernels {

using Tensor = torch::stable::Tensor;
using Device = torch::stable::Device;
using torch::headeronly::DeviceType;
using torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// A tensor's sizes, printed as torch prints them: [2, 3].
struct Sizes {
  std::vector<int64_t> values;
  bool operator==(const Sizes& other) const { return values == other.values; }
};
inline Sizes sizes(const Tensor& t) {
  const auto s = t.sizes();
  return {std::vector<int64_t>(s.begin(), s.end())};
}
inline std::ostream& operator<<(std::ostream& out, const Sizes& s) {
  out << '[';
  for (size_t i = 0; i < s.values.size(); ++i) out << (i ? ", " : "") << s.values[i];
  return out << ']';
}
inline bool same_sizes(const Tensor& a, const Tensor& b) { return sizes(a) == sizes(b); }

// Devices printed as torch prints them: cpu, cuda:0.
inline std::ostream& operator<<(std::ostream& out, DeviceType type) {
  switch (type) {
    case DeviceType::CPU: return out << "cpu";
    case DeviceType::CUDA: return out << "cuda";
    case DeviceType::Meta: return out << "meta";
    default: return out << "device type " << static_cast<int>(type);
  }
}
inline std::ostream& operator<<(std::ostream& out, const Device& d) {
  out << d.type();
  return d.has_index() ? out << ':' << static_cast<int>(d.index()) : out;
}

// The parts streamed into one string.
template <typename... Parts>
std::string str(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

// VQK_CHECK(cond, parts...): throws std::runtime_error (RuntimeError in Python) with the
// parts as its message.
#define VQK_CHECK(cond, ...)                                                 \
  do {                                                                       \
    if (!(cond)) throw std::runtime_error(::vqkernels::str(__VA_ARGS__));    \
  } while (false)

inline int64_t dim_size(const Tensor& t, int64_t dim) {
  return t.size(dim < 0 ? dim + t.dim() : dim);
}
inline int64_t dim_stride(const Tensor& t, int64_t dim) {
  return t.stride(dim < 0 ? dim + t.dim() : dim);
}

using torch::stable::contiguous;  // contiguous(t)
using torch::stable::empty_like;  // empty_like(t)
using torch::stable::new_empty;   // new_empty(like, sizes, dtype): on like's device

// Calls the ATen op name.overload, which has no stable wrapper, on args; returns the stack,
// its outputs first (each an owning handle: take every one with detail::to).
template <typename... Args>
std::array<StableIValue, sizeof...(Args)> call_aten(const char* name, const char* overload,
                                                    const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return stack;
}

// The same for an op with one tensor out.
template <typename... Args>
Tensor call_aten_tensor(const char* name, const char* overload, const Args&... args) {
  return torch::stable::detail::to<Tensor>(call_aten(name, overload, args...)[0]);
}

// out = a @ b, written into out (aten::mm.out).
inline void mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  call_aten_tensor("aten::mm", "out", a, b, out);  // its result, an alias of out, is dropped
}

// Typed element pointers.
template <typename T>
T* data(const Tensor& t) { return static_cast<T*>(t.mutable_data_ptr()); }
template <typename T>
const T* cdata(const Tensor& t) { return static_cast<const T*>(t.const_data_ptr()); }

}  // namespace vqkernels

// The dtype dispatch of ATen's AT_DISPATCH_* on the stable ABI: the lambda sees scalar_t.
#define VQK_CASE(TYPE, ...) THO_DISPATCH_CASE(::vqkernels::ScalarType::TYPE, __VA_ARGS__)
#define VQK_CASES_FLOAT_DOUBLE(...) VQK_CASE(Float, __VA_ARGS__) VQK_CASE(Double, __VA_ARGS__)
#define VQK_CASES_FLOATING(...) \
  VQK_CASES_FLOAT_DOUBLE(__VA_ARGS__) VQK_CASE(Half, __VA_ARGS__) VQK_CASE(BFloat16, __VA_ARGS__)
#define VQK_CASES_INTEGRAL(...)                                                          \
  VQK_CASE(Byte, __VA_ARGS__) VQK_CASE(Char, __VA_ARGS__) VQK_CASE(Short, __VA_ARGS__) \
  VQK_CASE(Int, __VA_ARGS__) VQK_CASE(Long, __VA_ARGS__)

// float and double (AT_DISPATCH_FLOATING_TYPES).
#define VQK_DISPATCH_FLOAT_DOUBLE(TYPE, NAME, ...) \
  THO_DISPATCH_SWITCH(TYPE, NAME, VQK_CASES_FLOAT_DOUBLE(__VA_ARGS__))
// and float16, bfloat16 (AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16, ...)).
#define VQK_DISPATCH_FLOATING(TYPE, NAME, ...) \
  THO_DISPATCH_SWITCH(TYPE, NAME, VQK_CASES_FLOATING(__VA_ARGS__))
// and the integer types (AT_DISPATCH_ALL_TYPES_AND2(kHalf, kBFloat16, ...)).
#define VQK_DISPATCH_FLOATING_AND_INTEGRAL(TYPE, NAME, ...) \
  THO_DISPATCH_SWITCH(TYPE, NAME, VQK_CASES_FLOATING(__VA_ARGS__) VQK_CASES_INTEGRAL(__VA_ARGS__))
