// LibTorch smoke test of the CMake library: linking it registers the ops with the
// dispatcher (its C++ API), and the embedding op agrees with the formula at a
// hand-checked point.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>

int main() {
  const at::Tensor t = torch::tensor({0.0f, 10.0f});
  // dim 5, max_period 100: freqs [1, 0.1]; row 1 = [cos 10, cos 1, sin 10, sin 1, 0].
  const at::Tensor expected = torch::tensor(
      {{1.0f, 1.0f, 0.0f, 0.0f, 0.0f},
       {std::cos(10.0f), std::cos(1.0f), std::sin(10.0f), std::sin(1.0f), 0.0f}});
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("vqkernels::timestep_embedding", "")
                .typed<at::Tensor(const at::Tensor&, int64_t, double, bool, double, double,
                                  at::ScalarType)>();
  const at::Tensor got = op.call(t, 5, 100.0, true, 0.0, 1.0, at::kFloat);
  if (!torch::allclose(got, expected, 0, 1e-6)) {
    std::printf("vqkernels smoke test FAILED\n");
    return 1;
  }
  std::printf("vqkernels smoke test passed\n");
  return 0;
}
