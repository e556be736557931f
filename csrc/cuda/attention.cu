// Forward scaled dot-product attention, non-causal, FlashAttention-2 style on
// tensor cores (spec: vqkernels/reference/attention.py::attention_lse).
//
//   s   = scale * q k^T          (per (b, h): Sq x Sk)
//   lse = log(sum_j exp(s_j))    natural log, fp32
//   out = softmax(s) v           in q's dtype (fp16 / bf16), fp32 accumulation
//
// A CTA of kWarps warps owns kM query rows of one (b, h), a warp 16 of them,
// holding its Q fragments, S tile and O accumulators in registers. The CTA
// walks the keys in blocks of kN, double-buffering the K and V tiles in shared
// memory (cp.async), with S = Q K^T and O += P V on mma.sync and an online
// softmax in the log2 domain. Query blocks of one (b, h) are adjacent in the
// grid, so K and V are read from L2 after the first.
#include <cuda_runtime.h>

#include <cstdint>

#include "dispatch.cuh"
#include "kernels.h"
#include "mma.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#pragma nv_diag_suppress 177  // the kernel body is compiled out, its helpers unused
#endif

namespace vqkernels::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kM = 16 * kWarps;  // query rows per CTA
constexpr int kN = 64;           // keys per block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tile geometry for head dim D (elements are 16-bit; smem tiles are rows of kStride).
template <int D>
struct Tiles {
  static_assert(D % 8 == 0 && D >= 8 && D <= 128, "head dim must be a multiple of 8 in [8, 128]");
  static constexpr int kSteps = (D + 15) / 16;       // k16 steps of Q K^T
  static constexpr bool kHalfStep = D % 16 == 8;     // the last step has 8 real columns
  static constexpr int kFullSteps = D / 16;
  static constexpr int kDTiles = D / 8;              // n8 tiles of O (and 16-byte chunks per row)
  static constexpr int kKeyTiles = kN / 8;           // n8 tiles of S
  static constexpr int kPSteps = kN / 16;            // k16 steps of P V
  // A row of an odd number of 16-byte chunks puts the 8 rows one ldmatrix
  // reads in 8 different bank quads (conflict-free); even counts get one pad chunk.
  static constexpr int kStride = kDTiles % 2 ? D : D + 8;
  static constexpr int kTileElems = kN * kStride;
  static constexpr size_t kSmemBytes = (size_t{kM} + 4 * kN) * kStride * sizeof(uint16_t);
  static_assert(kN % 32 == 0 && kM == 16 * kWarps, "one m16 tile per warp, 32-key ldmatrix groups");
};

struct Params {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  float* lse;
  int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss;  // strides, elements
  int64_t heads;
  int sq, sk, m_blocks;
  float scale_log2;
};

// ---- global <-> shared ---------------------------------------------------------------------

// Rows [row0, row0 + ROWS) of a (rows, D) matrix with row stride `stride` into a
// shared tile of ROWS x kStride; rows >= limit become zeros (V's masked keys must
// be finite: they meet p = 0). Unaligned inputs take plain 2-byte loads.
template <int D, int ROWS, bool kAligned>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* src, int64_t stride,
                                          int row0, int limit) {
  constexpr int kChunks = Tiles<D>::kDTiles, kTotal = ROWS * kChunks;
#pragma unroll
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int i = it * kThreads + threadIdx.x;
    if (kTotal % kThreads != 0 && i >= kTotal) break;
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool valid = row0 + r < limit;
    const uint16_t* g = src + (valid ? static_cast<int64_t>(row0 + r) * stride + c : 0);
    uint16_t* s = tile + r * Tiles<D>::kStride + c;
    if constexpr (kAligned) {
      cp_async_16(s, g, valid);
    } else {
      const auto pair = [&](int e) { return g[e] | (static_cast<uint32_t>(g[e + 1]) << 16); };
      *reinterpret_cast<uint4*>(s) =
          valid ? make_uint4(pair(0), pair(2), pair(4), pair(6)) : make_uint4(0, 0, 0, 0);
    }
  }
}

// ---- per-warp fragment math -------------------------------------------------------------

// This warp's Q rows as A fragments, one per k-step (the half step's upper 8 columns zero).
template <int D>
__device__ __forceinline__ void load_q_frags(uint32_t (&qa)[Tiles<D>::kSteps][4],
                                             const uint16_t* sq_tile, int warp, int lane) {
  using S = Tiles<D>;
  // Matrices 0..3 = (rows 0-7, cols 0-7), (rows 8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = a[0..3].
  const int row = 16 * warp + (lane & 7) + ((lane >> 3) & 1) * 8;
  const uint32_t base = smem_u32(sq_tile + row * S::kStride + (lane >> 4) * 8);
#pragma unroll
  for (int t = 0; t < S::kFullSteps; ++t) ldsm_x4(qa[t], base + t * 32);
  if constexpr (S::kHalfStep) {
    ldsm_x2(qa[S::kFullSteps][0], qa[S::kFullSteps][1], base + S::kFullSteps * 32);
    qa[S::kFullSteps][2] = qa[S::kFullSteps][3] = 0;
  }
}

// s[j] = Q K^T for key n8-tile j (keys 8j..8j+7 of the block), fp32.
template <typename T, int D>
__device__ __forceinline__ void qk_tile(float (&s)[Tiles<D>::kKeyTiles][4],
                                        const uint32_t (&qa)[Tiles<D>::kSteps][4],
                                        const uint16_t* sk_tile, int lane) {
  using S = Tiles<D>;
#pragma unroll
  for (int j = 0; j < S::kKeyTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
  // K is stored (key, d), which is B^T: non-transposed ldmatrix yields B fragments.
  // Matrices 0..3 = (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7),
  // (keys 8-15, d 8-15) = b0, b1 of tile 2p, then b0, b1 of tile 2p + 1.
  const int key = (lane & 7) + (lane >> 4) * 8;
  const uint32_t base = smem_u32(sk_tile + key * S::kStride + ((lane >> 3) & 1) * 8);
#pragma unroll
  for (int t = 0; t < S::kFullSteps; ++t) {
#pragma unroll
    for (int p = 0; p < S::kKeyTiles / 2; ++p) {
      uint32_t b[4];
      ldsm_x4(b, base + (p * 16 * S::kStride + t * 16) * 2);
      mma_16816<T>(s[2 * p], qa[t], b[0], b[1]);
      mma_16816<T>(s[2 * p + 1], qa[t], b[2], b[3]);
    }
  }
  if constexpr (S::kHalfStep) {
    // Only k rows 0-7 (b0) are real; matrix i = keys 8i..8i+7 of a 32-key group.
    const uint32_t half = smem_u32(sk_tile + lane * S::kStride + S::kFullSteps * 16);
#pragma unroll
    for (int g = 0; g < S::kKeyTiles / 4; ++g) {
      uint32_t b[4];
      ldsm_x4(b, half + g * 32 * S::kStride * 2);
#pragma unroll
      for (int i = 0; i < 4; ++i) mma_16816<T>(s[4 * g + i], qa[S::kFullSteps], b[i], 0u);
    }
  }
}

// o[j] += P V for d n8-tile j; P comes straight from the S accumulators: the C
// fragments of key tiles 2t and 2t + 1 are the A fragment of k-step t.
template <typename T, int D>
__device__ __forceinline__ void pv_tile(float (&o)[Tiles<D>::kDTiles][4],
                                        const float (&p)[Tiles<D>::kKeyTiles][4],
                                        const uint16_t* sv_tile, int lane) {
  using S = Tiles<D>;
  // V is stored (key, d) = B row-major: .trans yields B fragments. Matrices 0..3 =
  // (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15).
  const int key = (lane & 7) + ((lane >> 3) & 1) * 8;
  const uint32_t base = smem_u32(sv_tile + key * S::kStride + (lane >> 4) * 8);
#pragma unroll
  for (int t = 0; t < S::kPSteps; ++t) {
    const uint32_t a[4] = {pack2<T>(p[2 * t][0], p[2 * t][1]), pack2<T>(p[2 * t][2], p[2 * t][3]),
                           pack2<T>(p[2 * t + 1][0], p[2 * t + 1][1]),
                           pack2<T>(p[2 * t + 1][2], p[2 * t + 1][3])};
    const uint32_t row = base + t * 16 * S::kStride * 2;
#pragma unroll
    for (int jp = 0; jp < S::kDTiles / 2; ++jp) {
      uint32_t b[4];
      ldsm_x4<true>(b, row + jp * 16 * 2);
      mma_16816<T>(o[2 * jp], a, b[0], b[1]);
      mma_16816<T>(o[2 * jp + 1], a, b[2], b[3]);
    }
    if constexpr (S::kDTiles % 2) {
      uint32_t b0, b1;
      ldsm_x2<true>(b0, b1, row + (S::kDTiles - 1) * 8 * 2);
      mma_16816<T>(o[S::kDTiles - 1], a, b0, b1);
    }
  }
}

// One online-softmax step on a 16 x kN logit tile. Thread rows: r = 0 is row g
// (elements 0, 1 of every tile), r = 1 is row g + 8 (elements 2, 3). s becomes
// p = exp2(s * scale_log2 - m); m (log2 domain), l (this thread's partial sum)
// and o are rescaled by exp2(m_old - m_new). valid_keys < kN masks the tail.
template <int D>
__device__ __forceinline__ void online_softmax(float (&s)[Tiles<D>::kKeyTiles][4],
                                               float (&o)[Tiles<D>::kDTiles][4], float (&m)[2],
                                               float (&l)[2], float scale_log2, int valid_keys,
                                               int lane) {
  using S = Tiles<D>;
  const bool tail = valid_keys < kN;  // warp-uniform: only the last key block
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < S::kKeyTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] *= scale_log2;  // scale first, mask after: scale may be negative
      if (tail && 8 * j + 2 * (lane & 3) + (e & 1) >= valid_keys) s[j][e] = -INFINITY;
      mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
    }
  }
  float m_use[2], alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(m[r], row_max4(mx[r]));
    m_use[r] = m_new == -INFINITY ? 0.0f : m_new;  // an all -inf row must not make inf - inf
    alpha[r] = exp2f(m[r] - m_use[r]);
    m[r] = m_new;
    l[r] *= alpha[r];
  }
#pragma unroll
  for (int j = 0; j < S::kKeyTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] = exp2f(s[j][e] - m_use[e >> 1]);
      l[e >> 1] += s[j][e];
    }
  }
#pragma unroll
  for (int j = 0; j < S::kDTiles; ++j) {
    o[j][0] *= alpha[0];
    o[j][1] *= alpha[0];
    o[j][2] *= alpha[1];
    o[j][3] *= alpha[1];
  }
}

// ---- the kernel ----------------------------------------------------------------------------

// kAligned: every pointer and used stride is a multiple of 16 bytes (cp.async and
// 16-byte stores); otherwise plain 2-byte loads and stores.
template <typename T, int D, bool kAligned>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.m16n8k16 / cp.async need sm_80; the launcher refuses older devices
#else
  using S = Tiles<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sq_tile = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sk_tiles = sq_tile + kM * S::kStride;     // 2 stages
  uint16_t* sv_tiles = sk_tiles + 2 * S::kTileElems;  // 2 stages

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x / p.m_blocks;
  const int m0 = (blockIdx.x % p.m_blocks) * kM;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const uint16_t* q = p.q + b * p.q_sb + h * p.q_sh;
  const uint16_t* k = p.k + b * p.k_sb + h * p.k_sh;
  const uint16_t* v = p.v + b * p.v_sb + h * p.v_sh;

  load_tile<D, kM, kAligned>(sq_tile, q, p.q_ss, m0, p.sq);
  load_tile<D, kN, kAligned>(sk_tiles, k, p.k_ss, 0, p.sk);
  load_tile<D, kN, kAligned>(sv_tiles, v, p.v_ss, 0, p.sk);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  uint32_t qa[S::kSteps][4];
  load_q_frags<D>(qa, sq_tile, warp, lane);
  float o[S::kDTiles][4];
#pragma unroll
  for (int j = 0; j < S::kDTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  const int blocks = (p.sk + kN - 1) / kN;
  for (int j = 0; j < blocks; ++j) {
    const int stage = j & 1;
    if (j + 1 < blocks) {  // stage ^ 1 held block j - 1, released by the barrier below
      load_tile<D, kN, kAligned>(sk_tiles + (stage ^ 1) * S::kTileElems, k, p.k_ss, (j + 1) * kN,
                                 p.sk);
      load_tile<D, kN, kAligned>(sv_tiles + (stage ^ 1) * S::kTileElems, v, p.v_ss, (j + 1) * kN,
                                 p.sk);
      cp_async_commit();
    }
    float s[S::kKeyTiles][4];
    qk_tile<T, D>(s, qa, sk_tiles + stage * S::kTileElems, lane);
    const int valid_keys = p.sk - j * kN;  // >= kN except in the tail block
    online_softmax<D>(s, o, m, l, p.scale_log2, valid_keys, lane);
    pv_tile<T, D>(o, s, sv_tiles + stage * S::kTileElems, lane);
    cp_async_wait_all();
    __syncthreads();
  }

  // Normalize, then stage this warp's O rows in its own (dead) Q rows for 16-byte stores.
  const int g = lane / 4, t4 = lane % 4;
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = row_sum4(l[r]);
    inv[r] = 1.0f / l[r];
    const int row = m0 + 16 * warp + g + 8 * r;
    if (t4 == 0 && row < p.sq) p.lse[bh * p.sq + row] = (m[r] + log2f(l[r])) * kLn2;
  }
  uint16_t* my_rows = sq_tile + 16 * warp * S::kStride;
#pragma unroll
  for (int j = 0; j < S::kDTiles; ++j) {
    const int col = 8 * j + 2 * t4;
    *reinterpret_cast<uint32_t*>(my_rows + g * S::kStride + col) =
        pack2<T>(o[j][0] * inv[0], o[j][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(my_rows + (g + 8) * S::kStride + col) =
        pack2<T>(o[j][2] * inv[1], o[j][3] * inv[1]);
  }
  __syncwarp();
  for (int i = lane; i < 16 * S::kDTiles; i += 32) {
    const int r = i / S::kDTiles, c = (i % S::kDTiles) * 8;
    const int row = m0 + 16 * warp + r;
    if (row >= p.sq) continue;
    const uint16_t* src = my_rows + r * S::kStride + c;
    uint16_t* dst = p.out + (bh * p.sq + row) * D + c;
    if constexpr (kAligned) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = src[e];
    }
  }
#endif
}

// ---- launch --------------------------------------------------------------------------------

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// A stride needs to be a multiple of 8 elements only where its index varies.
bool strides_aligned(const int64_t* st, int64_t batch, int64_t heads, int64_t rows) {
  return (batch < 2 || st[0] % 8 == 0) && (heads < 2 || st[1] % 8 == 0) &&
         (rows < 2 || st[2] % 8 == 0);
}

template <typename T, int D>
cudaError_t launch_d(const Params& p, bool aligned, int64_t grid, cudaStream_t stream) {
  const auto kernel = aligned ? attention_forward_kernel<T, D, true>
                              : attention_forward_kernel<T, D, false>;
  constexpr size_t kSmem = Tiles<D>::kSmemBytes;
  if constexpr (kSmem > 48 * 1024) {
    // Set on every launch: the attribute is per device, and the current one may change.
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kSmem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(grid), kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const Params& p, bool aligned, int64_t d, int64_t grid,
                         cudaStream_t stream) {
  switch (d) {
#define VQK_CASE(DIM) \
  case DIM: return launch_d<T, DIM>(p, aligned, grid, stream);
    VQK_ATTENTION_HEAD_DIMS(VQK_CASE)
#undef VQK_CASE
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_attention_forward(const void* q, const void* k, const void* v, DType dtype,
                                     int64_t batch, int64_t heads, int64_t sq, int64_t sk,
                                     int64_t d, const int64_t* q_strides, const int64_t* k_strides,
                                     const int64_t* v_strides, float scale, void* out, float* lse,
                                     cudaStream_t stream) {
  if (dtype != DType::Float16 && dtype != DType::BFloat16) return cudaErrorInvalidValue;
  if (batch < 0 || heads < 0 || sq < 0 || sk < 0 || d < 1) return cudaErrorInvalidValue;
  if (batch == 0 || heads == 0 || sq == 0) return cudaSuccess;  // no queries: nothing to write
  if (sk < 1 || sq > kMaxAttentionLength || sk > kMaxAttentionLength) return cudaErrorInvalidValue;
  if (q_strides[3] != 1 || k_strides[3] != 1 || v_strides[3] != 1) return cudaErrorInvalidValue;
  const int64_t m_blocks = (sq + kM - 1) / kM;
  const int64_t grid = m_blocks * batch * heads;  // query blocks of one (b, h) adjacent
  if (grid > INT32_MAX) return cudaErrorInvalidConfiguration;

  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major < 8) return cudaErrorNotSupported;

  Params p;
  p.q = static_cast<const uint16_t*>(q);
  p.k = static_cast<const uint16_t*>(k);
  p.v = static_cast<const uint16_t*>(v);
  p.out = static_cast<uint16_t*>(out);
  p.lse = lse;
  p.q_sb = q_strides[0], p.q_sh = q_strides[1], p.q_ss = q_strides[2];
  p.k_sb = k_strides[0], p.k_sh = k_strides[1], p.k_ss = k_strides[2];
  p.v_sb = v_strides[0], p.v_sh = v_strides[1], p.v_ss = v_strides[2];
  p.heads = heads;
  p.sq = static_cast<int>(sq);
  p.sk = static_cast<int>(sk);
  p.m_blocks = static_cast<int>(m_blocks);
  p.scale_log2 = scale * kLog2e;
  const bool aligned = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(out) &&
              strides_aligned(q_strides, batch, heads, sq) &&
              strides_aligned(k_strides, batch, heads, sk) &&
              strides_aligned(v_strides, batch, heads, sk);
  return dtype == DType::Float16 ? launch_dtype<__half>(p, aligned, d, grid, stream)
                                 : launch_dtype<__nv_bfloat16>(p, aligned, d, grid, stream);
}

}  // namespace vqkernels::cuda
