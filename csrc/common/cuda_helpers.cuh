// CUDA helpers shared by every op's cuda.cu (include from .cu files only), written once so that no
// kernel spells them out for itself; none changes what a kernel computes.
//   packets     16-byte vector loads and stores: Packet, load_packet / store_packet (raw elements),
//               load_packet_as / store_packet_as (converted to and from the compute type)
//   reductions  warp_sum (all 32 lanes), group_sum (aligned groups of G lanes)
//   loops       warp_row (one warp per row), group_rows (groups of G lanes walk rows in step),
//               block_stride_loop (a block walks n elements)
//   launches    aligned16, checked_grid_x (grid size check), launch_kernel (<<<...>>> + launch check)
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

namespace vdit {

// ---- packets ----------------------------------------------------------------------------------

// Bytes of one vector load / store, the widest a thread issues.
constexpr int kPacketBytes = 16;

// Elements of T in one packet.
template <typename T>
constexpr int kPacketElems = kPacketBytes / int(sizeof(T));

// N consecutive elements moved by one load / store; p must be aligned to sizeof(T) * N.
template <typename T, int N>
struct alignas(sizeof(T) * N) Packet {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Packet<T, N> load_packet(const T* p) {
  return *reinterpret_cast<const Packet<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_packet(T* p, const Packet<T, N>& v) {
  *reinterpret_cast<Packet<T, N>*>(p) = v;
}

// dst[0 .. N) = the N elements at p, converted to A (one packet load; a plain load for N == 1).
template <int N, typename T, typename A>
__device__ __forceinline__ void load_packet_as(const T* p, A* dst) {
  if constexpr (N == 1) {
    dst[0] = static_cast<A>(*p);
  } else {
    const Packet<T, N> pk = load_packet<T, N>(p);
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = static_cast<A>(pk.v[e]);
  }
}

// The N elements at p = src[0 .. N) converted to T (one packet store; a plain store for N == 1).
template <int N, typename T, typename A>
__device__ __forceinline__ void store_packet_as(T* p, const A* src) {
  if constexpr (N == 1) {
    *p = static_cast<T>(src[0]);
  } else {
    Packet<T, N> pk;
#pragma unroll
    for (int e = 0; e < N; ++e) pk.v[e] = static_cast<T>(src[e]);
    store_packet<T, N>(p, pk);
  }
}

// ---- reductions -------------------------------------------------------------------------------

// Sum of v over the 32 lanes of the warp, in every lane. Every lane of the warp must call it.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over each aligned group of G lanes (G a power of two <= 32), in every lane of the group.
// Every lane of the warp must call it.
template <typename A>
__device__ __forceinline__ A group_sum(A v, int G) {
  for (int off = G >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---- loops ------------------------------------------------------------------------------------
// block_stride_loop takes the body as a lambda: keep it short (a load, a store). A whole row body
// passed as a lambda (the rope kernels' row loop, with its register arrays) cost registers and an
// 8-byte stack frame; group_rows is a range for such loops, so their body stays in the kernel.

// Rows [0, rows) handed to groups of G consecutive lanes (G a power of two <= 32, so a group lies
// within one warp), blockDim.x / G rows per pass: `for (int64_t row : group_rows(rows, G))` visits
// this lane's row of each pass. Every lane runs the same number of passes (active(row) is false
// past the last row), so warp shuffles and __syncwarp inside a pass see the whole warp.
struct GroupRows {
  int G, lane, groups;
  int64_t rows;

  __device__ __forceinline__ bool active(int64_t row) const { return row < rows; }

  struct End {};
  struct Iter {
    int64_t base, rows;
    int groups, offset;
    __device__ __forceinline__ int64_t operator*() const { return base + offset; }
    __device__ __forceinline__ void operator++() { base += groups; }
    __device__ __forceinline__ bool operator!=(End) const { return base < rows; }
  };
  __device__ __forceinline__ Iter begin() const { return Iter{0, rows, groups, int(threadIdx.x / G)}; }
  __device__ __forceinline__ End end() const { return End{}; }
};

__device__ __forceinline__ GroupRows group_rows(int64_t rows, int G) {
  return GroupRows{G, int(threadIdx.x % G), int(blockDim.x / G), rows};
}

// One warp per row, kWarps rows per block (blockDim.x == 32 * kWarps): the row of this thread's warp
// (past the last row in the last block: the caller returns) and its lane.
struct WarpRow {
  int64_t row;
  int lane;
};

template <int kWarps>
__device__ __forceinline__ WarpRow warp_row() {
  return WarpRow{int64_t(blockIdx.x) * kWarps + threadIdx.x / 32, int(threadIdx.x % 32)};
}

// A block of kThreads threads walks n elements, kStep consecutive ones per call: f(i) for
// i = threadIdx.x * kStep, then kThreads * kStep further each time, while i < n.
template <int kThreads, int kStep, typename F>
__device__ __forceinline__ void block_stride_loop(int64_t n, F&& f) {
  for (int64_t i = threadIdx.x * kStep; i < n; i += kThreads * kStep) f(i);
}

// The same for any block size, one element per call: f(i) for i = threadIdx.x, + blockDim.x, ... < n.
template <typename F>
__device__ __forceinline__ void block_stride_loop(int n, F&& f) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) f(i);
}

// ---- launches ---------------------------------------------------------------------------------

// True when every pointer is on a kPacketBytes boundary (packet loads and stores need it).
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % kPacketBytes) return false;
  }
  return true;
}

// A grid of `blocks` blocks along x, checked to fit one launch.
inline unsigned checked_grid_x(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks < (int64_t(1) << 31), op, ": ", blocks, " blocks are too many for one launch");
  return static_cast<unsigned>(blocks);
}

// kernel<<<grid, block, smem, stream>>>(args...), then the launch check (an invalid configuration
// raises here instead of at the next synchronizing call).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vdit
