#pragma once
// pyengine's CUDA matrix multiply, shared by linear (dense operands) and conv2d (implicit GEMM:
// the im2col matrix is never written, its elements are computed where the tile loads them).
//
//   C[z][i, j] = sum_k A[z](i, k) * B[z](k, j)      i < M, j < N, k < K, z < Z (conv groups)
//
// Operands are functors, so one kernel serves x W^T, dY W, dY^T X and the three convolution
// GEMMs. An operand describes a "line" (a row i of A, or a column j of B) and a position k:
//
//   static constexpr bool kAlongK;     consecutive k are adjacent in memory: the tile loader
//                                      then walks k fastest across threads (coalesced), else
//                                      it walks lines fastest.
//   Line line(int64_t z, int64_t r)    per-line state (a base pointer, window origin, ...),
//                                      computed once per tile, outside the k loop.
//   KPos kpos(int64_t k)               per-k state, shared by all lines a thread loads at k.
//   T load(const Line&, const KPos&)   the element (0 for padding); only called in range.
//
// The epilogue `epi(z, i, j, acc)` stores C[z][i, j] (adding a bias, scattering to NCHW...).
//
// Types: the kernels' T is the COMPUTE type (compute_t of the storage type, launchers.h: float
// for bfloat16 / float16 operands). Operands load their storage type and return T (to_compute,
// device.cuh), so the shared-memory tiles, the accumulators and the split-K partials are in T,
// and the epilogue rounds each result once (from_compute) as it stores it.
//
// Kernel: 256 threads (16 x 16) own a BM x BN tile of C; each thread a (BM/16) x (BN/16)
// register tile whose rows/columns are 16 apart (conflict-free shared-memory reads, coalesced
// stores). K is walked in steps of kBK = 16 through shared memory. Three tile shapes: 64 x 64,
// and 16 x 128 / 128 x 16 for the skinny GEMMs of small layers (LeNet's 6 or 16 channels), so
// that few tile rows are wasted on padding.
//
// Determinism: every C element is summed by one thread, k ascending, with fused multiply-adds.
// Split-K (for the weight gradients, whose K is the batch): the k range is cut into `splits`
// chunks fixed by the shapes alone; each chunk writes its partial tile to a workspace, and a
// second kernel adds the partials in chunk order. No atomics: bitwise reproducible.
//
// Napkin math: per k step a thread does (BM/16)(BN/16) FMAs (16 for 64 x 64) against
// (BM+BN)/16 shared loads (8): ~2 FMAs per shared load, so this simple kernel tops out well under
// the ~60 TFLOP/s fp32 FMA peak (device.cuh; expect ~10-20 TFLOP/s on large square GEMMs). For the
// LeNet layers, K is 25..400 and the GEMMs are tiny: launch and memory bound, not FLOP bound.
// 16-bit operands halve the global bytes loaded and stored, not the FMAs (float32 tiles; tensor
// cores are not used).
#include "cuda/device.cuh"

namespace pyengine {
namespace cuda {
namespace gemm {

constexpr int kBK = 16;
constexpr int kGemmThreads = 256;
// Split-K: aim for this many blocks in flight (two per SM of an H100; a shape-only constant, so
// results do not depend on the GPU), with at least kMinKPerSplit values of k per chunk.
PE_LAUNCH_CAP(kTargetBlocks, 264);
PE_LAUNCH_CAP(kMinKPerSplit, 512);
PE_LAUNCH_CAP(kMaxSplits, 1024);
PE_LAUNCH_CAP(kMaxTileBlocks, int64_t(1) << 20);
PE_LAUNCH_CAP(kMaxGridZ, 65535);  // the hardware's gridDim.z limit

template <typename T>
__device__ __forceinline__ T fma_(T a, T b, T c) {
  return fma(a, b, c);
}

// A dense operand of storage type T: element (z, r, k) at p[z * zs + r * rs + k * ks] (kAlongK
// requires ks == 1), loaded as compute_t<T>.
template <typename T, bool kK>
struct Dense {
  static constexpr bool kAlongK = kK;
  using Line = const T*;
  using KPos = int64_t;
  const T* p;
  int64_t zs, rs, ks;
  __device__ Line line(int64_t z, int64_t r) const { return p + z * zs + r * rs; }
  __device__ KPos kpos(int64_t k) const { return kK ? k : k * ks; }
  __device__ compute_t<T> load(const Line& l, const KPos& k) const { return to_compute(l[k]); }
};

// Loads a kBK x BL slice (BL lines of the tile, kBK values of k) into shared memory S[k][line].
template <typename T, int BL, class Op>
struct TileLoader {
  static constexpr int kLoads = BL * kBK / kGemmThreads;  // elements per thread per k step
  static constexpr int kLines = Op::kAlongK ? kLoads : 1;
  static_assert(kLoads >= 1 && kGemmThreads % BL == 0, "tile shape");

  typename Op::Line line[kLines];
  bool valid[kLines];

  // Line l of this thread, and its k offset within the step.
  __device__ static int line_of(int l) {
    return Op::kAlongK ? static_cast<int>(threadIdx.x) / kBK + l * (kGemmThreads / kBK)
                       : static_cast<int>(threadIdx.x) % BL;
  }
  __device__ static int k_of(int l) {
    return Op::kAlongK ? static_cast<int>(threadIdx.x) % kBK
                       : static_cast<int>(threadIdx.x) / BL + l * (kGemmThreads / BL);
  }

  __device__ TileLoader(const Op& op, int64_t z, int64_t r0, int64_t extent) {
#pragma unroll
    for (int l = 0; l < kLines; ++l) {
      const int64_t r = r0 + line_of(l);
      valid[l] = r < extent;
      line[l] = op.line(z, valid[l] ? r : r0);  // r0 < extent: always a valid line
    }
  }

  __device__ void load(const Op& op, T (*S)[BL + 1], int64_t k0, int64_t k_end) const {
    if (Op::kAlongK) {
      const int kk = k_of(0);
      const int64_t k = k0 + kk;
      const bool k_in = k < k_end;
      const typename Op::KPos kp = op.kpos(k_in ? k : k0);
#pragma unroll
      for (int l = 0; l < kLoads; ++l)
        S[kk][line_of(l)] = (k_in && valid[l]) ? op.load(line[l], kp) : T(0);
    } else {
      const int r = line_of(0);
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        const int kk = k_of(l);
        const int64_t k = k0 + kk;
        S[kk][r] = (valid[0] && k < k_end) ? op.load(line[0], op.kpos(k)) : T(0);
      }
    }
  }
};

struct Args {
  int64_t M, N, K;
  int64_t k_chunk;  // k values per split
  int64_t splits;
  int64_t z_base;   // first group of this launch (gridDim.z is capped at 65535)
};

template <typename T, int BM, int BN, class OpA, class OpB, class Epi>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_kernel(const Args args, const OpA a, const OpB b, const Epi epi, T* __restrict__ partial) {
  constexpr int TM = BM / 16, TN = BN / 16;
  __shared__ T As[kBK][BM + 1];
  __shared__ T Bs[kBK][BN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t z = args.z_base + blockIdx.z;
  const int64_t split = blockIdx.y;
  const int64_t k_begin = split * args.k_chunk;
  const int64_t k_end = min(args.K, k_begin + args.k_chunk);
  const int64_t mt = (args.M + BM - 1) / BM;
  const int64_t tiles = mt * ((args.N + BN - 1) / BN);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t i0 = (tile % mt) * BM;
    const int64_t j0 = (tile / mt) * BN;
    const TileLoader<T, BM, OpA> la(a, z, i0, args.M);
    const TileLoader<T, BN, OpB> lb(b, z, j0, args.N);
    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
      la.load(a, As, k0, k_end);
      lb.load(b, Bs, k0, k_end);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        T av[TM], bv[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < TN; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fma_(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t gi = i0 + ty + 16 * i;
      if (gi >= args.M) continue;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int64_t gj = j0 + tx + 16 * j;
        if (gj >= args.N) continue;
        if (partial != nullptr) {
          partial[((z * args.splits + split) * args.M + gi) * args.N + gj] = acc[i][j];
        } else {
          epi(z, gi, gj, acc[i][j]);
        }
      }
    }
  }
}

// C[z][i, j] = sum over splits s, in order, of partial[z][s][i, j].
template <typename T, class Epi>
__global__ void split_reduce_kernel(const T* __restrict__ partial, const int64_t M, const int64_t N,
                                    const int64_t Z, const int64_t splits, const Epi epi) {
  const int64_t mn = M * N;
  PE_GRID_STRIDE_LOOP(e, Z * mn) {
    const int64_t z = e / mn;
    const int64_t r = e - z * mn;
    const T* p = partial + z * splits * mn + r;
    T s = p[0];
    for (int64_t sp = 1; sp < splits; ++sp) s += p[sp * mn];
    epi(z, r / N, r % N, s);
  }
}

enum class Shape { Square, WideN, TallM };

inline Shape pick_shape(int64_t M, int64_t N) {
  if (M <= 16) return Shape::WideN;
  if (N <= 16) return Shape::TallM;
  return Shape::Square;
}

inline void tile_dims(Shape s, int* bm, int* bn) {
  *bm = s == Shape::WideN ? 16 : (s == Shape::TallM ? 128 : 64);
  *bn = s == Shape::WideN ? 128 : (s == Shape::TallM ? 16 : 64);
}

struct Plan {
  Shape shape;
  int64_t tiles;  // per group
  int64_t splits, k_chunk;
};

// From the shapes alone (never the device): the tile shape and the split of K.
inline Plan make_plan(int64_t M, int64_t N, int64_t K, int64_t Z, bool allow_split) {
  Plan p;
  p.shape = pick_shape(M, N);
  int bm, bn;
  tile_dims(p.shape, &bm, &bn);
  p.tiles = ((M + bm - 1) / bm) * ((N + bn - 1) / bn);
  p.splits = 1;
  const int64_t blocks = p.tiles * Z;
  if (allow_split && blocks < kTargetBlocks && K >= 2 * kMinKPerSplit) {
    int64_t want = (kTargetBlocks + blocks - 1) / blocks;
    const int64_t by_k = K / kMinKPerSplit;
    if (want > by_k) want = by_k;
    if (want > kMaxSplits) want = kMaxSplits;
    p.splits = want < 1 ? 1 : want;
  }
  if (p.splits > 1) {
    p.k_chunk = ((K + p.splits - 1) / p.splits + kBK - 1) / kBK * kBK;
    p.splits = (K + p.k_chunk - 1) / p.k_chunk;
  }
  if (p.splits <= 1) {
    p.splits = 1;
    p.k_chunk = K;
  }
  return p;
}

// Elements of the compute type the split-K partials need (0 without a split).
inline int64_t workspace_elements(int64_t M, int64_t N, int64_t K, int64_t Z, bool allow_split) {
  if (M <= 0 || N <= 0 || Z <= 0) return 0;
  const Plan p = make_plan(M, N, K, Z, allow_split);
  return p.splits > 1 ? Z * p.splits * M * N : 0;
}

template <typename T, int BM, int BN, bool kSplit, class OpA, class OpB, class Epi>
cudaError_t launch_shape(const Plan& plan, int64_t M, int64_t N, int64_t K, int64_t Z,
                         const OpA& a, const OpB& b, const Epi& epi, T* workspace,
                         cudaStream_t stream) {
  Args args{M, N, K, plan.k_chunk, plan.splits, 0};
  T* partial = plan.splits > 1 ? workspace : nullptr;
  const unsigned gx = static_cast<unsigned>(plan.tiles < kMaxTileBlocks ? plan.tiles
                                                                        : kMaxTileBlocks);
  for (int64_t z0 = 0; z0 < Z; z0 += kMaxGridZ) {
    args.z_base = z0;
    const unsigned gz = static_cast<unsigned>(Z - z0 < kMaxGridZ ? Z - z0 : kMaxGridZ);
    gemm_kernel<T, BM, BN, OpA, OpB, Epi>
        <<<dim3(gx, static_cast<unsigned>(plan.splits), gz), kGemmThreads, 0, stream>>>(
            args, a, b, epi, partial);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if constexpr (kSplit) {
    if (plan.splits > 1) {
      split_reduce_kernel<T, Epi>
          <<<grid_for(Z * M * N), kThreads, 0, stream>>>(workspace, M, N, Z, plan.splits, epi);
    }
  }
  return cudaGetLastError();
}

// C = A B for every group z < Z, stored through `epi`. With kSplit, K may be cut (split-K) and
// `workspace` holds workspace_elements(M, N, K, Z, true) elements (null when that is 0).
template <typename T, bool kSplit, class OpA, class OpB, class Epi>
cudaError_t launch(int64_t M, int64_t N, int64_t K, int64_t Z, const OpA& a, const OpB& b,
                   const Epi& epi, T* workspace, cudaStream_t stream) {
  if (M <= 0 || N <= 0 || Z <= 0) return cudaSuccess;
  const Plan plan = make_plan(M, N, K, Z, kSplit);
  switch (plan.shape) {
    case Shape::WideN:
      return launch_shape<T, 16, 128, kSplit>(plan, M, N, K, Z, a, b, epi, workspace, stream);
    case Shape::TallM:
      return launch_shape<T, 128, 16, kSplit>(plan, M, N, K, Z, a, b, epi, workspace, stream);
    case Shape::Square:
      break;
  }
  return launch_shape<T, 64, 64, kSplit>(plan, M, N, K, Z, a, b, epi, workspace, stream);
}

}  // namespace gemm
}  // namespace cuda
}  // namespace pyengine
