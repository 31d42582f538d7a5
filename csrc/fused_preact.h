// Shared declarations of the fused_preact ops: input checks and layout
// helpers used by the CPU (cpu/) and CUDA (cuda/) kernels.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>

namespace fused_preact {

// How a 4-D tensor's elements are laid out in memory. Kernels index two dense
// layouts: NCHW (x[n][c][hw]) and channels-last (x[m][c], m = n*H*W + hw).
enum class Layout { kNCHW, kChannelsLast, kStrided };

Layout layout_of(const at::Tensor& x);
// x itself if dense in one of the two layouts, else a dense copy.
at::Tensor dense(const at::Tensor& x);
// float32 for float32/float16/bfloat16 x, float64 for float64 x.
at::ScalarType stats_dtype(const at::Tensor& x);

// Argument checks; each names the op and the argument in its message.
void check_bn_input(const at::Tensor& x, const char* op);
void check_channel_vector(const at::Tensor& v, const at::Tensor& x, const char* name, const char* op);
void check_same_as_x(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op);
void check_channel_vectors(const at::Tensor& x,
                           std::initializer_list<std::pair<const at::Tensor*, const char*>> vectors, const char* op);
// Checks x and `other` (x's shape, device and dtype) and returns both dense,
// `other` in x's memory format: the entry of every two-tensor op. Callers
// std::tie the result: C++17 (torch <= 2.9) lambdas cannot capture
// structured bindings, and the dispatch lambdas capture these tensors.
std::pair<at::Tensor, at::Tensor> checked_dense_pair(const at::Tensor& x, const at::Tensor& other,
                                                     const char* other_name, const char* op);

// The device-independent part of bn_relu_backward_reduce: checked, dense
// (x, grad_out), contiguous per-channel vectors and the zeroed outputs.
// Plain tensors (no structured bindings): the dispatch lambdas capture them.
struct BackwardReduceArgs {
  at::Tensor x, grad_out, mean, scale, shift, sum_gz, sum_gz_xc;
};
BackwardReduceArgs backward_reduce_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                                        const at::Tensor& scale, const at::Tensor& shift);

// bn_relu_backward's argument checks; returns (gamma, beta) with the
// defaults (ones, zeros) filled in for absent weight/bias.
std::pair<at::Tensor, at::Tensor> bn_relu_backward_checks(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& mean, const at::Tensor& invstd,
                                                         const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& bias);

// bn_relu_backward as two dispatched ops (bn_relu_backward_reduce, then
// bn_relu_backward_apply): the device-generic implementation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_two_pass(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool training);

// bn_relu_backward_ (grad_x written over grad_out), device-generic.
std::tuple<at::Tensor, at::Tensor> bn_relu_backward_inplace_generic(
    at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool training);

// update_running_stats: its checks (shapes, count > 1, one device) and its
// device-generic implementation (tensor ops; CPU registers a loop).
void check_running_stats_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                                const at::Tensor& mean, const at::Tensor& var, int64_t count);
void update_running_stats_generic(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                  const at::Tensor& var, double momentum, int64_t count);

// (count, mean, M2) partials merged with Chan's formula: stable where the
// textbook sum(x^2) - M*mean^2 cancels catastrophically.
struct Welford {
  double count = 0, mean = 0, m2 = 0;
  void merge(double n_b, double mean_b, double m2_b) {
    if (n_b == 0) return;
    const double n = count + n_b;
    const double delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
};

}  // namespace fused_preact
