// CUDA kernels of the fused_preact batch-norm / ReLU / residual ops.
//
// Reductions (bn_stats, add_stats, bn_relu_backward_reduce) run in two
// kernels, like Triton's layer-norm tutorial splits its weight gradient:
//   1. partials: a 2-D grid of (channel tile, split of the N*H*W values);
//      each block reduces its part to one partial per channel
//      (Welford (count, mean, M2) for statistics, plain sums for backward);
//   2. finalize: one thread per channel merges the splits in double.
// The grid has enough splits to fill the GPU even when C is small (C = 16 in
// CIFAR ResNet-164), which one-block-per-channel kernels cannot.
// Elementwise passes (bn_relu, bn_relu_backward_apply) are grid-stride loops
// with 16-byte vector loads when every pointer is 16-byte aligned.
// Everything accumulates in fp32 (fp64 for fp64 inputs) and casts on store.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../fused_preact.h"

namespace fused_preact {
namespace {

constexpr int kThreads = 256;
// Channels-last reduction blocks: 32 channels (one coalesced warp-wide read
// of a row) by 8 rows.
constexpr int kTileC = 32, kTileRows = 8;

template <typename acc_t>
struct WelfordAcc {
  acc_t n, mean, m2;  // no initialisers: __shared__ arrays need a trivial type; use `Acc acc{};`
  __device__ void push(acc_t v) {
    n += acc_t(1);
    const acc_t d = v - mean;
    mean += d / n;
    m2 += d * (v - mean);
  }
  __device__ void merge(const WelfordAcc& o) {
    if (o.n == acc_t(0)) return;
    const acc_t total = n + o.n;
    const acc_t d = o.mean - mean;
    const acc_t w = o.n / total;
    mean += d * w;
    m2 += o.m2 + d * d * n * w;
    n = total;
  }
  __device__ WelfordAcc shfl_down(int delta) const {
    WelfordAcc o{};
    o.n = __shfl_down_sync(0xffffffff, n, delta);
    o.mean = __shfl_down_sync(0xffffffff, mean, delta);
    o.m2 = __shfl_down_sync(0xffffffff, m2, delta);
    return o;
  }
};

template <typename acc_t>
struct SumAcc {  // (sum gz, sum gz * (x - mean))
  acc_t g, gx;
  __device__ void merge(const SumAcc& o) {
    g += o.g;
    gx += o.gx;
  }
  __device__ SumAcc shfl_down(int delta) const {
    SumAcc o{};
    o.g = __shfl_down_sync(0xffffffff, g, delta);
    o.gx = __shfl_down_sync(0xffffffff, gx, delta);
    return o;
  }
};

// Visitors: what a reduction does with element i of channel c.
template <typename scalar_t, bool kAdd>
struct StatsVisitor {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = WelfordAcc<acc_t>;
  const scalar_t* x;
  const scalar_t* b;  // kAdd: out = x + b is written and reduced
  scalar_t* out;
  template <typename index_t>
  __device__ void operator()(Acc& acc, index_t i, index_t) const {
    acc_t v = static_cast<acc_t>(x[i]);
    if constexpr (kAdd) {
      const scalar_t s = static_cast<scalar_t>(v + static_cast<acc_t>(b[i]));
      out[i] = s;
      v = static_cast<acc_t>(s);  // the statistics of what was stored
    }
    acc.push(v);
  }
};

template <typename scalar_t>
struct BackwardSumsVisitor {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = SumAcc<acc_t>;
  const scalar_t* grad_out;
  const scalar_t* x;
  const acc_t *mean, *scale, *shift;
  template <typename index_t>
  __device__ void operator()(Acc& acc, index_t i, index_t c) const {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t gz = xv * scale[c] + shift[c] > acc_t(0) ? static_cast<acc_t>(grad_out[i]) : acc_t(0);
    acc.g += gz;
    acc.gx += gz * (xv - mean[c]);
  }
};

// NCHW partials: grid (C, splits), 1-D blocks. Block (c, s) visits values
// j in [s*chunk, (s+1)*chunk) of channel c: element (j / HW, c, j % HW).
template <typename Visitor, typename index_t>
__global__ void nchw_partials_kernel(Visitor visit, index_t C, index_t HW, index_t M, index_t chunk,
                                     typename Visitor::Acc* partials) {
  using Acc = typename Visitor::Acc;
  __shared__ Acc warp_results[kThreads / 32];
  const index_t c = blockIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk;
  const index_t end = min(begin + chunk, M);
  Acc acc{};
  for (index_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const index_t n = j / HW;
    visit(acc, (n * C + c) * HW + (j - n * HW), c);
  }
  for (int d = 16; d > 0; d /= 2) acc.merge(acc.shfl_down(d));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_results[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) acc.merge(warp_results[w]);
    partials[static_cast<int64_t>(blockIdx.y) * C + c] = acc;
  }
}

// Channels-last partials: grid (ceil(C/32), splits), blocks (32, 8). Block
// (t, s) visits rows [s*chunk, (s+1)*chunk) for channels t*32 .. t*32+31.
template <typename Visitor, typename index_t>
__global__ void channels_last_partials_kernel(Visitor visit, index_t C, index_t M, index_t chunk,
                                              typename Visitor::Acc* partials) {
  using Acc = typename Visitor::Acc;
  __shared__ Acc rows_results[kTileRows][kTileC];
  const index_t c = static_cast<index_t>(blockIdx.x) * kTileC + threadIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk;
  const index_t end = min(begin + chunk, M);
  Acc acc{};
  if (c < C) {
    for (index_t r = begin + threadIdx.y; r < end; r += kTileRows) visit(acc, r * C + c, c);
  }
  rows_results[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int r = 1; r < kTileRows; ++r) acc.merge(rows_results[r][threadIdx.x]);
    partials[static_cast<int64_t>(blockIdx.y) * C + c] = acc;
  }
}

template <typename acc_t>
__global__ void welford_finalize_kernel(const WelfordAcc<acc_t>* partials, int64_t splits, int64_t C,
                                        acc_t* mean, acc_t* var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double n = 0, m = 0, m2 = 0;
  for (int64_t s = 0; s < splits; ++s) {
    const WelfordAcc<acc_t> p = partials[s * C + c];
    if (p.n == acc_t(0)) continue;
    const double total = n + p.n, d = static_cast<double>(p.mean) - m;
    m += d * (p.n / total);
    m2 += static_cast<double>(p.m2) + d * d * (n * p.n / total);
    n = total;
  }
  mean[c] = static_cast<acc_t>(m);
  var[c] = static_cast<acc_t>(m2 / n);
}

template <typename acc_t>
__global__ void sums_finalize_kernel(const SumAcc<acc_t>* partials, int64_t splits, int64_t C, acc_t* sum_g,
                                     acc_t* sum_gx) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double g = 0, gx = 0;
  for (int64_t s = 0; s < splits; ++s) {
    g += partials[s * C + c].g;
    gx += partials[s * C + c].gx;
  }
  sum_g[c] = static_cast<acc_t>(g);
  sum_gx[c] = static_cast<acc_t>(gx);
}

// Launches the partials kernel for x's layout and returns (partials, splits).
// Splits are chosen so the grid holds about 4 blocks per SM, each block
// reduces at least a few thousand values, and float counts stay exact
// (a split is at most 2^22 values).
template <typename Visitor>
std::pair<at::Tensor, int64_t> launch_partials(const at::Tensor& x, const Visitor& visit) {
  using Acc = typename Visitor::Acc;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), M = N * HW;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool channels_last = layout_of(x) == Layout::kChannelsLast;
  const int64_t tiles = channels_last ? (C + kTileC - 1) / kTileC : C;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>((4 * sms + tiles - 1) / tiles, M / 4096));
  splits = std::max<int64_t>(splits, (M + (int64_t(1) << 22) - 1) >> 22);
  splits = std::min<int64_t>(splits, 65535);
  const int64_t chunk = (M + splits - 1) / splits;
  at::Tensor partials = at::empty({splits * C * static_cast<int64_t>(sizeof(Acc))}, x.options().dtype(at::kByte));
  auto* out = reinterpret_cast<Acc*>(partials.data_ptr());
  const bool small = x.numel() < std::numeric_limits<int32_t>::max();
  if (channels_last) {
    dim3 grid(tiles, splits), block(kTileC, kTileRows);
    if (small)
      channels_last_partials_kernel<Visitor, int32_t><<<grid, block, 0, stream>>>(visit, C, M, chunk, out);
    else
      channels_last_partials_kernel<Visitor, int64_t><<<grid, block, 0, stream>>>(visit, C, M, chunk, out);
  } else {
    dim3 grid(C, splits);
    if (small)
      nchw_partials_kernel<Visitor, int32_t><<<grid, kThreads, 0, stream>>>(visit, C, HW, M, chunk, out);
    else
      nchw_partials_kernel<Visitor, int64_t><<<grid, kThreads, 0, stream>>>(visit, C, HW, M, chunk, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partials, splits};
}

template <typename scalar_t, bool kAdd>
void channel_stats_cuda(const at::Tensor& x, const at::Tensor* b, at::Tensor* out, at::Tensor& mean,
                        at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  StatsVisitor<scalar_t, kAdd> visit{x.const_data_ptr<scalar_t>(), kAdd ? b->const_data_ptr<scalar_t>() : nullptr,
                                     kAdd ? out->mutable_data_ptr<scalar_t>() : nullptr};
  auto [partials, splits] = launch_partials(x, visit);
  const int64_t C = x.size(1);
  welford_finalize_kernel<acc_t><<<(C + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const WelfordAcc<acc_t>*>(partials.const_data_ptr()), splits, C,
      mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x_in) {
  check_bn_input(x_in, "fused_preact::bn_stats");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = dense(x_in);
  at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(stats_dtype(x)));
  at::Tensor var = at::empty_like(mean);
  if (x.numel() == 0) return {mean.fill_(NAN), var.fill_(NAN)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_stats_cuda", [&] {
    channel_stats_cuda<scalar_t, false>(x, nullptr, nullptr, mean, var);
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_stats_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  const char* op = "fused_preact::add_stats";
  c10::cuda::CUDAGuard guard(a_in.device());
  at::Tensor a, b;
  std::tie(a, b) = checked_dense_pair(a_in, b_in, "b", op);
  at::Tensor out = at::empty_like(a);
  at::Tensor mean = at::empty({a.size(1)}, a.options().dtype(stats_dtype(a)));
  at::Tensor var = at::empty_like(mean);
  if (a.numel() == 0) return {out, mean.fill_(NAN), var.fill_(NAN)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "add_stats_cuda", [&] {
    channel_stats_cuda<scalar_t, true>(a, &b, &out, mean, var);
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                                const at::Tensor& mean, const at::Tensor& scale,
                                                                const at::Tensor& shift) {
  c10::cuda::CUDAGuard guard(x_in.device());
  BackwardReduceArgs a = backward_reduce_args(grad_out_in, x_in, mean, scale, shift);
  const at::Tensor &x = a.x, &grad_out = a.grad_out, &m = a.mean, &s = a.scale, &b = a.shift;
  const at::Tensor &sum_gz = a.sum_gz, &sum_gz_xc = a.sum_gz_xc;
  const int64_t C = x.size(1);
  if (x.numel() == 0) return {sum_gz, sum_gz_xc};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardSumsVisitor<scalar_t> visit{grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                        m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(),
                                        b.const_data_ptr<acc_t>()};
    auto [partials, splits] = launch_partials(x, visit);
    sums_finalize_kernel<acc_t><<<(C + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const SumAcc<acc_t>*>(partials.const_data_ptr()), splits, C,
        sum_gz.mutable_data_ptr<acc_t>(), sum_gz_xc.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_gz, sum_gz_xc};
}

// ------------------------------------------------------------ elementwise

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename index_t, bool kChannelsLast>
__device__ __forceinline__ index_t channel_of(index_t i, index_t C, index_t HW) {
  return kChannelsLast ? i % C : (i / HW) % C;
}

// a = relu(x * scale + shift) [+ residual]
template <typename scalar_t, typename index_t, int VEC, bool kChannelsLast>
__global__ void bn_relu_kernel(const scalar_t* __restrict__ x,         // [numel]
                               const scalar_t* __restrict__ residual,  // [numel] or null
                               scalar_t* __restrict__ out,             // [numel]
                               const at::opmath_type<scalar_t>* __restrict__ scale,  // [C]
                               const at::opmath_type<scalar_t>* __restrict__ shift,  // [C]
                               index_t numel, index_t C, index_t HW) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x * VEC;
  for (index_t base = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; base < numel;
       base += step) {
    if (base + VEC <= numel) {
      const P xv = *reinterpret_cast<const P*>(x + base);
      P rv;
      if (residual) rv = *reinterpret_cast<const P*>(residual + base);
      P ov;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const index_t c = channel_of<index_t, kChannelsLast>(base + k, C, HW);
        acc_t a = max(static_cast<acc_t>(xv.v[k]) * scale[c] + shift[c], acc_t(0));
        if (residual) a += static_cast<acc_t>(rv.v[k]);
        ov.v[k] = static_cast<scalar_t>(a);
      }
      *reinterpret_cast<P*>(out + base) = ov;
    } else {
      for (index_t i = base; i < numel; ++i) {
        const index_t c = channel_of<index_t, kChannelsLast>(i, C, HW);
        acc_t a = max(static_cast<acc_t>(x[i]) * scale[c] + shift[c], acc_t(0));
        if (residual) a += static_cast<acc_t>(residual[i]);
        out[i] = static_cast<scalar_t>(a);
      }
    }
  }
}

// gx = gz * scale + x * k1 + k0,  gz = grad_out * [x * scale + shift > 0]
template <typename scalar_t, typename index_t, int VEC, bool kChannelsLast>
__global__ void bn_relu_backward_apply_kernel(const scalar_t* __restrict__ grad_out,  // [numel]
                                              const scalar_t* __restrict__ x,         // [numel]
                                              scalar_t* __restrict__ grad_x,          // [numel]
                                              const at::opmath_type<scalar_t>* __restrict__ scale,  // [C]
                                              const at::opmath_type<scalar_t>* __restrict__ shift,  // [C]
                                              const at::opmath_type<scalar_t>* __restrict__ k1,     // [C]
                                              const at::opmath_type<scalar_t>* __restrict__ k0,     // [C]
                                              index_t numel, index_t C, index_t HW) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x * VEC;
  for (index_t base = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; base < numel;
       base += step) {
    const index_t n_here = min(static_cast<index_t>(VEC), numel - base);
    P gv, xv, ov;
    if (n_here == VEC) {
      gv = *reinterpret_cast<const P*>(grad_out + base);
      xv = *reinterpret_cast<const P*>(x + base);
    } else {
      for (index_t k = 0; k < n_here; ++k) {
        gv.v[k] = grad_out[base + k];
        xv.v[k] = x[base + k];
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < n_here) {
        const index_t c = channel_of<index_t, kChannelsLast>(base + k, C, HW);
        const acc_t xk = static_cast<acc_t>(xv.v[k]);
        const acc_t gz = xk * scale[c] + shift[c] > acc_t(0) ? static_cast<acc_t>(gv.v[k]) : acc_t(0);
        ov.v[k] = static_cast<scalar_t>(gz * scale[c] + xk * k1[c] + k0[c]);
      }
    }
    if (n_here == VEC) {
      *reinterpret_cast<P*>(grad_x + base) = ov;
    } else {
      for (index_t k = 0; k < n_here; ++k) grad_x[base + k] = ov.v[k];
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Picks the vector width (16 bytes when every pointer allows it), the index
// type and the layout, then calls launch(VEC, index_t{}, channels_last tag).
template <typename scalar_t, typename Launch>
void dispatch_elementwise(const at::Tensor& x, std::initializer_list<const void*> pointers, Launch&& launch) {
  bool vec_ok = true;
  for (const void* p : pointers) vec_ok = vec_ok && (p == nullptr || aligned16(p));
  const bool small = x.numel() < std::numeric_limits<int32_t>::max() - 64;
  const bool channels_last = layout_of(x) == Layout::kChannelsLast;
  constexpr int kVec = 16 / sizeof(scalar_t);
  auto with_index = [&](auto index_tag) {
    using index_t = decltype(index_tag);
    if (vec_ok) {
      if (channels_last) launch(std::integral_constant<int, kVec>{}, index_t{}, std::true_type{});
      else launch(std::integral_constant<int, kVec>{}, index_t{}, std::false_type{});
    } else {
      if (channels_last) launch(std::integral_constant<int, 1>{}, index_t{}, std::true_type{});
      else launch(std::integral_constant<int, 1>{}, index_t{}, std::false_type{});
    }
  };
  if (small) with_index(int32_t{});
  else with_index(int64_t{});
}

int64_t elementwise_blocks(int64_t numel, int vec) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (numel + static_cast<int64_t>(kThreads) * vec - 1) / (static_cast<int64_t>(kThreads) * vec);
  return std::max<int64_t>(1, std::min<int64_t>(needed, sms * 16));
}

at::Tensor bn_relu_cuda(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
                        const std::optional<at::Tensor>& residual_in) {
  const char* op = "fused_preact::bn_relu";
  check_bn_input(x_in, op);
  check_channel_vectors(x_in, {{&scale, "scale"}, {&shift, "shift"}}, op);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = dense(x_in);
  at::Tensor residual;
  if (residual_in.has_value()) {
    check_same_as_x(*residual_in, x, "residual", op);
    residual = residual_in->contiguous(x.suggest_memory_format());
  }
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  at::Tensor s = scale.contiguous(), b = shift.contiguous();
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    dispatch_elementwise<scalar_t>(x, {xp, rp, op_}, [&](auto vec, auto index_tag, auto cl) {
      using index_t = decltype(index_tag);
      constexpr int V = decltype(vec)::value;
      bn_relu_kernel<scalar_t, index_t, V, decltype(cl)::value>
          <<<elementwise_blocks(x.numel(), V), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              xp, rp, op_, s.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), static_cast<index_t>(x.numel()),
              static_cast<index_t>(C), static_cast<index_t>(HW));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor bn_relu_backward_apply_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& scale,
                                       const at::Tensor& shift, const at::Tensor& k1, const at::Tensor& k0) {
  const char* op = "fused_preact::bn_relu_backward_apply";
  at::Tensor x, grad_out;
  std::tie(x, grad_out) = checked_dense_pair(x_in, grad_out_in, "grad_out", op);
  check_channel_vectors(x, {{&scale, "scale"}, {&shift, "shift"}, {&k1, "k1"}, {&k0, "k0"}}, op);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return grad_x;
  at::Tensor s = scale.contiguous(), b = shift.contiguous(), a1 = k1.contiguous(), a0 = k0.contiguous();
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu_backward_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    dispatch_elementwise<scalar_t>(x, {gp, xp, gxp}, [&](auto vec, auto index_tag, auto cl) {
      using index_t = decltype(index_tag);
      constexpr int V = decltype(vec)::value;
      bn_relu_backward_apply_kernel<scalar_t, index_t, V, decltype(cl)::value>
          <<<elementwise_blocks(x.numel(), V), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              gp, xp, gxp, s.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), a1.const_data_ptr<acc_t>(),
              a0.const_data_ptr<acc_t>(), static_cast<index_t>(x.numel()), static_cast<index_t>(C),
              static_cast<index_t>(HW));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_x;
}

}  // namespace
}  // namespace fused_preact

TORCH_LIBRARY_IMPL(fused_preact, CUDA, m) {
  m.impl("bn_stats", &fused_preact::bn_stats_cuda);
  m.impl("bn_relu", &fused_preact::bn_relu_cuda);
  m.impl("bn_relu_backward_reduce", &fused_preact::bn_relu_backward_reduce_cuda);
  m.impl("bn_relu_backward_apply", &fused_preact::bn_relu_backward_apply_cuda);
  m.impl("add_stats", &fused_preact::add_stats_cuda);
}
