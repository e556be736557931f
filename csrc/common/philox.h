#pragma once
// Counter-based standard normal noise, the same stream as Triton's
// tl.randn(seed, offset) and vqkernels.reference.ddim.philox_normal:
// Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as
// 1, 2, 3") on counter (offset, 0, 0, 0) with key (seed lo, seed hi), its
// first two words turned into uniforms and then one Box-Muller normal.
#include <math.h>
#include <stdint.h>

#include "macros.h"

namespace vqkernels::common {

VQK_HOST_DEVICE uint32_t mul_hi_lo(uint32_t a, uint32_t b, uint32_t* low) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *low = static_cast<uint32_t>(product);
  return static_cast<uint32_t>(product >> 32);
}

// Words 0 and 1 of Philox4x32-10 at counter (offset, 0, 0, 0).
VQK_HOST_DEVICE void philox_two_words(uint64_t seed, uint32_t offset, uint32_t* w0,
                                      uint32_t* w1) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t lo0, lo2;
    const uint32_t hi0 = mul_hi_lo(c0, 0xD2511F53u, &lo0);
    const uint32_t hi2 = mul_hi_lo(c2, 0xCD9E8D57u, &lo2);
    c0 = hi2 ^ c1 ^ k0;
    c2 = hi0 ^ c3 ^ k1;
    c1 = lo2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  *w0 = c0;
  *w1 = c1;
}

// A word read as int32, folded onto [0, 2^31) and scaled into [0, 1).
VQK_HOST_DEVICE float word_to_uniform(uint32_t word) {
  const int32_t v = static_cast<int32_t>(word);
  return static_cast<float>(v < 0 ? ~v : v) * 4.6566127342e-10f;
}

VQK_HOST_DEVICE float philox_normal(uint64_t seed, uint32_t offset) {
  uint32_t w0, w1;
  philox_two_words(seed, offset, &w0, &w1);
  const float u0 = fmaxf(word_to_uniform(w0), 1.0e-7f);
  const float u1 = word_to_uniform(w1);
  return sqrtf(-2.0f * logf(u0)) * cosf(6.283185307179586f * u1);
}

}  // namespace vqkernels::common
