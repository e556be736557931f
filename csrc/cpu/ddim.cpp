// The fused DDIM step op (vqkernels::ddim_step) and its C++ CPU kernel. The
// op checks its arguments once and turns them into one common::DdimStep
// record, which this file's CPU kernel or the CUDA launcher
// (csrc/cuda/launchers.cpp) runs. Math in csrc/common/ddim.h, spec in
// vqkernels/reference/ddim.py::ddim_step.
//
// Per element of sample b, index j < M:
//   out   = j < guided_elems ? uncond + s * (cond - uncond) : cond      (CFG)
//   x0    = predicted clean sample (epsilon / sample / v), clipped or thresholded
//   prev  = sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps + std * noise
// with noise given or drawn from csrc/common/philox.h at counter b * M + j,
// in (sample, chunk) tiles run in parallel; one read and write per element.
#include <algorithm>
#include <memory>
#include <string>
#include <type_traits>

#include "common/cpu_isa.h"  // first: its pragma quiets -Wpsabi in the headers after it
#include "common/checks.h"
#include "common/ddim.h"
#include "common/philox.h"
#include "vqkernels.h"

// No fused multiply-adds: every element rounds as the float32 reference does,
// so the fp32 step is bitwise the diffusers step (FMA made it more accurate
// but different, and it is bandwidth-bound either way).
#pragma GCC optimize("fp-contract=off")

namespace vqkernels {
namespace {

constexpr int64_t kChunk = 2048;           // elements per tile: its float buffers stay in L1/L2
constexpr int64_t kMinTilesPerTask = 16;   // small steps stay on one thread

// Float32 copies of one tile's inputs and outputs, for the types that are not
// float32 themselves (and scratch for an output that is not written).
struct TileBuffers {
  float x[kChunk], cond[kChunk], uncond[kChunk], noise[kChunk], x0[kChunk], prev[kChunk];
};
alignas(64) constexpr float kNoNoise[kChunk] = {};

// Elements [begin, end) of one tile, guided when uncond is given: lanes of V
// (a float SIMD vector), then the tail one float at a time.
template <typename V>
VQK_ALWAYS_INLINE void step_segment(const float* x, const float* cond, const float* uncond,
                                    const float* z, float* x0, float* prev, int64_t begin,
                                    int64_t end, float threshold, const common::DdimCoefficients& c,
                                    const common::DdimParams& p) {
  constexpr int64_t kWidth = sizeof(V) / sizeof(float);
  int64_t j = begin;
  for (; j + kWidth <= end; j += kWidth) {
    V out = common::load_vec<V>(cond + j);
    if (uncond) out = common::cfg_guide(out, common::load_vec<V>(uncond + j), p.guidance_scale);
    const auto e = common::ddim_element(common::load_vec<V>(x + j), out, common::load_vec<V>(z + j), threshold, c, p);
    common::store_vec(x0 + j, e.x0);
    common::store_vec(prev + j, e.prev);
  }
  for (; j < end; ++j) {
    const float out = uncond ? common::cfg_guide(cond[j], uncond[j], p.guidance_scale) : cond[j];
    const auto e = common::ddim_element(x[j], out, z[j], threshold, c, p);
    x0[j] = e.x0;
    prev[j] = e.prev;
  }
}

// The step of a tile's n float32 elements, the first `guided` of them guided.
template <int kVectorBytes>
VQK_ALWAYS_INLINE void step_floats(const float* x, const float* cond, const float* uncond,
                                   int64_t guided, const float* z, float* x0, float* prev, int64_t n,
                                   float threshold, const common::DdimCoefficients& c,
                                   const common::DdimParams& p) {
  using Vec = typename common::Simd<float, kVectorBytes>::Vec;
  step_segment<Vec>(x, cond, uncond, z, x0, prev, 0, guided, threshold, c, p);
  step_segment<Vec>(x, cond, nullptr, z, x0, prev, guided, n, threshold, c, p);
}

using StepFloats = void (*)(const float*, const float*, const float*, int64_t, const float*,
                            float*, float*, int64_t, float, const common::DdimCoefficients&,
                            const common::DdimParams&);

#define VQK_DEFINE_STEP_FLOATS(NAME, TARGET, VECTOR_BYTES)                                       \
  TARGET void NAME##_step_floats(const float* x, const float* cond, const float* uncond,        \
                                 int64_t guided, const float* z, float* x0, float* prev,        \
                                 int64_t n, float threshold, const common::DdimCoefficients& c, \
                                 const common::DdimParams& p) {                                 \
    step_floats<VECTOR_BYTES>(x, cond, uncond, guided, z, x0, prev, n, threshold, c, p);        \
  }
VQK_DEFINE_ISA_COPIES(VQK_DEFINE_STEP_FLOATS)
#undef VQK_DEFINE_STEP_FLOATS

StepFloats select_step_floats() {
#define VQK_STEP_FLOATS(NAME) &NAME##_step_floats
  return VQK_PICK_ISA(common::cpu_isa(), VQK_STEP_FLOATS);
#undef VQK_STEP_FLOATS
}

// p[0, n) as float32: p itself when it is float32, else converted into buf.
template <typename T>
const float* as_floats(const T* p, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(p[j]);
    return buf;
  }
}

// Where a float32 output of n elements goes: straight into `to` when the
// output is written and float32, else into buf (copied out by store_floats).
template <typename S>
float* float_output(void* to, float* buf) {
  if constexpr (std::is_same_v<S, float>) return to ? static_cast<float*>(to) : buf;
  return buf;
}
template <typename S>
void store_floats(const float* from, void* to, int64_t n) {
  if constexpr (!std::is_same_v<S, float>) {
    if (!to) return;
    S* out = static_cast<S*>(to);
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<S>(from[j]);
  }
}

// The tile's noise as float32: given (in the sample's dtype or float32),
// drawn from Philox at counter b * M + j, or zeros.
template <typename S>
const float* tile_noise(const common::DdimPointers& ptr, const common::DdimParams& p, int64_t first,
                        int64_t n, float* buf) {
  if (!ptr.prev || p.eta <= 0.0f) return kNoNoise;
  if (ptr.noise && ptr.noise_float32) return static_cast<const float*>(ptr.noise) + first;
  if (ptr.noise) return as_floats(static_cast<const S*>(ptr.noise) + first, n, buf);
  if (!ptr.seed) return kNoNoise;
  const uint64_t seed = static_cast<uint64_t>(*ptr.seed);
  for (int64_t j = 0; j < n; ++j) buf[j] = common::philox_normal(seed, static_cast<uint32_t>(first + j));
  return buf;
}

// Elements [begin, end) of sample b (M elements).
template <typename S, typename O>
void step_tile(const common::DdimPointers& ptr, const common::DdimParams& p, StepFloats step,
               int64_t b, int64_t m, int64_t begin, int64_t end, TileBuffers& buf) {
  const auto c = common::ddim_coefficients(ptr.alphas_cumprod, ptr.timesteps[b * ptr.timestep_stride], p);
  const float threshold = ptr.threshold ? ptr.threshold[b] : 0.0f;
  const int64_t n = end - begin, first = b * m + begin;
  const O* cond = static_cast<const O*>(ptr.cond) + b * ptr.cond_stride + begin;
  const int64_t guided = ptr.uncond ? std::clamp(p.guided_elems - begin, int64_t{0}, n) : 0;
  const float* uncond = guided ? as_floats(static_cast<const O*>(ptr.uncond) + b * ptr.uncond_stride + begin,
                                           guided, buf.uncond)
                               : nullptr;
  float* x0 = float_output<S>(ptr.x0 ? static_cast<S*>(ptr.x0) + first : nullptr, buf.x0);
  float* prev = float_output<S>(ptr.prev ? static_cast<S*>(ptr.prev) + first : nullptr, buf.prev);
  step(as_floats(static_cast<const S*>(ptr.sample) + first, n, buf.x), as_floats(cond, n, buf.cond),
       uncond, guided, tile_noise<S>(ptr, p, first, n, buf.noise), x0, prev, n, threshold, c, p);
  store_floats<S>(x0, ptr.x0 ? static_cast<S*>(ptr.x0) + first : nullptr, n);
  store_floats<S>(prev, ptr.prev ? static_cast<S*>(ptr.prev) + first : nullptr, n);
}

// Calls f(S{}) with S the C++ element type of a floating dtype.
template <typename F>
void dispatch_floating(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(Half{});
    case DType::BFloat16: return f(BFloat16{});
    default: VQK_CHECK(false, "ddim_step takes floating sample and model outputs");
  }
}

void ddim_step_cpu(const common::DdimStep& step) {
  const int64_t b = step.batch, m = step.elems, chunks = (m + kChunk - 1) / kChunk;
  const StepFloats kernel = select_step_floats();
  dispatch_floating(step.sample_dtype, [&](auto s_tag) {
    using S = decltype(s_tag);
    dispatch_floating(step.output_dtype, [&](auto o_tag) {
      using O = decltype(o_tag);
      torch::stable::parallel_for(0, b * chunks, kMinTilesPerTask, [&](int64_t begin, int64_t end) {
        auto buf = std::make_unique<TileBuffers>();
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t row = tile / chunks, start = (tile % chunks) * kChunk;
          step_tile<S, O>(step.ptr, step.params, kernel, row, m, start,
                          std::min(start + kChunk, m), *buf);
        }
      });
    });
  });
}

// --- the op's checks: what would crash a kernel (the rest is validated in
// vqkernels/ops/ddim.py) ------------------------------------------------------

// torch's Tensor.is_floating_point(): float64, float32 and the reduced floating types.
bool is_floating_point(const Tensor& x) {
  switch (x.scalar_type()) {
    case ScalarType::Double:
    case ScalarType::Float:
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Float8_e5m2:
    case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fn:
    case ScalarType::Float8_e4m3fnuz:
    case ScalarType::Float8_e8m0fnu:
    case ScalarType::Float4_e2m1fn_x2: return true;
    default: return false;
  }
}

void check_same_device(const Tensor& x, const Tensor& sample, const char* name) {
  VQK_CHECK(x.device() == sample.device(), name, " must be on the sample's device ",
            sample.device(), ", got ", x.device());
}

// sample (B, M) contiguous; cond and uncond (B, >= M) with unit column stride
// and one floating dtype; timesteps (B,) int64; alphas_cumprod (T,) float32.
void check_step_inputs(const Tensor& sample, const Tensor& cond,
                       const std::optional<Tensor>& uncond, const Tensor& timesteps,
                       const Tensor& alphas_cumprod) {
  VQK_CHECK(sample.dim() == 2 && sample.is_contiguous() && is_floating_point(sample),
            "sample must be a contiguous floating (B, M) tensor");
  const int64_t b = sample.size(0), m = sample.size(1);
  VQK_CHECK(b * std::max<int64_t>(m, 1) < (int64_t{1} << 31),
            "sample must have fewer than 2^31 elements (the noise counter is 32-bit)");
  const auto check_output = [&](const Tensor& x, const char* name) {
    check_same_device(x, sample, name);
    VQK_CHECK(x.dim() == 2 && x.size(0) == b && x.size(1) >= m && is_floating_point(x) &&
                  (x.size(1) <= 1 || x.stride(1) == 1),
              name, " must be a floating (B, >= M) tensor with unit column stride");
  };
  check_output(cond, "cond");
  if (uncond) {
    check_output(*uncond, "uncond");
    VQK_CHECK(uncond->scalar_type() == cond.scalar_type(), "uncond must have cond's dtype");
  }
  check_same_device(timesteps, sample, "timesteps");
  VQK_CHECK(timesteps.dim() == 1 && timesteps.size(0) == b &&
                timesteps.scalar_type() == ScalarType::Long,
            "timesteps must be int64 (B,)");
  check_same_device(alphas_cumprod, sample, "alphas_cumprod");
  VQK_CHECK(alphas_cumprod.dim() == 1 && alphas_cumprod.is_contiguous() &&
                alphas_cumprod.scalar_type() == ScalarType::Float && alphas_cumprod.numel() >= 1,
            "alphas_cumprod must be a contiguous float32 (T,) table");
}

// variance_noise like sample (its dtype or float32), noise_seed one int64 (not
// both), threshold (B,) float32 contiguous.
void check_step_noise(const Tensor& sample, const std::optional<Tensor>& variance_noise,
                      const std::optional<Tensor>& noise_seed,
                      const std::optional<Tensor>& threshold) {
  if (variance_noise) {
    check_same_device(*variance_noise, sample, "variance_noise");
    VQK_CHECK(same_sizes(*variance_noise, sample) && variance_noise->is_contiguous() &&
                  (variance_noise->scalar_type() == sample.scalar_type() ||
                   variance_noise->scalar_type() == ScalarType::Float),
              "variance_noise must be contiguous, with the sample's shape and its dtype or ",
              "float32");
  }
  if (noise_seed) {
    check_same_device(*noise_seed, sample, "noise_seed");
    VQK_CHECK(noise_seed->numel() == 1 && noise_seed->scalar_type() == ScalarType::Long,
              "noise_seed must be one int64");
  }
  VQK_CHECK(!(variance_noise && noise_seed), "give variance_noise or noise_seed, not both");
  if (threshold) {
    check_same_device(*threshold, sample, "threshold");
    VQK_CHECK(threshold->dim() == 1 && threshold->size(0) == sample.size(0) &&
                  threshold->is_contiguous() && threshold->scalar_type() == ScalarType::Float,
              "threshold must be a contiguous float32 (B,)");
  }
}

common::Prediction parse_prediction(std::string_view prediction_type) {
  if (prediction_type == "epsilon") return common::Prediction::Epsilon;
  if (prediction_type == "sample") return common::Prediction::Sample;
  if (prediction_type == "v_prediction") return common::Prediction::VPrediction;
  VQK_CHECK(false, "prediction_type must be epsilon, sample or v_prediction, got ",
            prediction_type);
}

// An output like sample, or empty (0,) when it is not written.
Tensor step_output(const Tensor& sample, bool write) {
  return write ? new_empty(sample, sample.sizes()) : new_empty(sample, {0});
}

const void* data_or_null(const std::optional<Tensor>& x) {
  return x ? x->const_data_ptr() : nullptr;
}

}  // namespace

std::tuple<Tensor, Tensor> ddim_step(VQK_DDIM_STEP_ARGS) {
  check_step_inputs(sample, cond, uncond, timesteps, alphas_cumprod);
  check_step_noise(sample, variance_noise, noise_seed, threshold);
  VQK_CHECK(step_ratio >= 1, "step_ratio must be >= 1, got ", step_ratio);
  VQK_CHECK(guided_elems >= 0 && guided_elems <= sample.size(1), "guided_elems must be in [0, M]");
  Tensor prev = step_output(sample, write_prev), x0 = step_output(sample, write_x0);
  const common::DdimParams params{
      alphas_cumprod.numel(), step_ratio, static_cast<float>(final_alpha_cumprod),
      static_cast<float>(eta), parse_prediction(prediction_type), clip_sample,
      static_cast<float>(clip_sample_range), use_clipped_model_output,
      static_cast<float>(guidance_scale), uncond ? guided_elems : 0};
  const common::DdimPointers ptr{
      sample.const_data_ptr(), cond.const_data_ptr(), data_or_null(uncond), cond.stride(0),
      uncond ? uncond->stride(0) : 0, cdata<float>(alphas_cumprod),
      cdata<int64_t>(timesteps), timesteps.stride(0), data_or_null(variance_noise),
      variance_noise && variance_noise->scalar_type() == ScalarType::Float,
      static_cast<const int64_t*>(data_or_null(noise_seed)),
      static_cast<const float*>(data_or_null(threshold)),
      write_prev ? prev.mutable_data_ptr() : nullptr, write_x0 ? x0.mutable_data_ptr() : nullptr};
  const common::DdimStep step{params, ptr, sample.size(0), sample.size(1),
                              to_dtype(sample.scalar_type()), to_dtype(cond.scalar_type())};
  if (step.batch * step.elems == 0 || !(write_prev || write_x0)) return {prev, x0};
#ifdef VQKERNELS_WITH_CUDA
  if (sample.is_cuda()) {
    ddim_step_cuda(step, sample.device());
    return {prev, x0};
  }
#endif
  VQK_CHECK_DEVICE(sample, DeviceType::CPU);
  ddim_step_cpu(step);
  return {prev, x0};
}

}  // namespace vqkernels
