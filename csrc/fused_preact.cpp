// Schemas of every fused_preact:: op, written once (extension-cpp style), and
// the device-generic ("composite") ops built from the per-device kernels in
// cpu/ and cuda/. Math: ../shared/DESIGN.md section 2 (see README for a copy
// of the formulas beside each op).
//
// Per-channel vectors (mean, var, invstd, scale, shift, partial sums) are
// float32, or float64 for float64 inputs: statistics never live in fp16/bf16.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "fused_preact.h"

// `import fused_preact._C` needs a module init; the ops register themselves
// through the static initialisers of TORCH_LIBRARY blocks when the .so loads.
// `_C.openmp` records whether this file was compiled with OpenMP: without it
// at::parallel_for silently runs on one thread (see setup.py).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef _OPENMP
  const long openmp = 1;
#else
  const long openmp = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "openmp", openmp) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

namespace fused_preact {

void check_bn_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D of shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
              x.scalar_type());
}

void check_channel_vector(const at::Tensor& v, const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), op, ": ", name, " must have shape (C,) = (", x.size(1),
              ",) to match x's channels, got ", v.sizes());
  TORCH_CHECK(v.device() == x.device(), op, ": ", name, " is on ", v.device(), " but x is on ", x.device());
  TORCH_CHECK(v.scalar_type() == stats_dtype(x), op, ": ", name, " must be ", stats_dtype(x), " for ",
              x.scalar_type(), " x, got ", v.scalar_type());
}

void check_same_as_x(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
}

void check_channel_vectors(const at::Tensor& x,
                           std::initializer_list<std::pair<const at::Tensor*, const char*>> vectors, const char* op) {
  for (const auto& [v, name] : vectors) check_channel_vector(*v, x, name, op);
}

std::pair<at::Tensor, at::Tensor> checked_dense_pair(const at::Tensor& x_in, const at::Tensor& other,
                                                     const char* other_name, const char* op) {
  check_bn_input(x_in, op);
  check_same_as_x(other, x_in, other_name, op);
  at::Tensor x = dense(x_in);
  return {x, other.contiguous(x.suggest_memory_format())};
}

BackwardReduceArgs backward_reduce_args(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                        const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift) {
  const char* op = "fused_preact::bn_relu_backward_reduce";
  BackwardReduceArgs a;
  std::tie(a.x, a.grad_out) = checked_dense_pair(x_in, grad_out_in, "grad_out", op);
  check_channel_vectors(a.x, {{&mean, "mean"}, {&scale, "scale"}, {&shift, "shift"}}, op);
  a.mean = mean.contiguous();
  a.scale = scale.contiguous();
  a.shift = shift.contiguous();
  a.sum_gz = at::zeros({a.x.size(1)}, mean.options());
  a.sum_gz_xc = at::zeros({a.x.size(1)}, mean.options());
  return a;
}

at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Layout layout_of(const at::Tensor& x) {
  // Channels-last wins when both descriptions fit (C == 1 or H == W == 1):
  // then the two layouts are the same bytes and either indexing is right.
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::kChannelsLast;
  if (x.is_contiguous()) return Layout::kNCHW;
  return Layout::kStrided;
}

at::Tensor dense(const at::Tensor& x) {
  // Non-contiguous inputs (slices, transposes) are copied once into the
  // memory format closest to their strides; the kernels then index densely.
  if (layout_of(x) != Layout::kStrided) return x;
  return x.contiguous(x.suggest_memory_format());
}

std::pair<at::Tensor, at::Tensor> bn_relu_backward_checks(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& mean, const at::Tensor& invstd,
                                                         const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& bias) {
  const char* op = "fused_preact::bn_relu_backward";
  check_bn_input(x, op);
  check_same_as_x(grad_out, x, "grad_out", op);
  check_channel_vector(mean, x, "mean", op);
  check_channel_vector(invstd, x, "invstd", op);
  at::Tensor gamma = weight.has_value() ? *weight : at::ones_like(mean);
  at::Tensor beta = bias.has_value() ? *bias : at::zeros_like(mean);
  check_channel_vector(gamma, x, "weight", op);
  check_channel_vector(beta, x, "bias", op);
  return {gamma, beta};
}

// gx = gz * scale + x * k1 + k0, with gz = grad_out * [x*scale + shift > 0].
// Training: ggamma = invstd * S, gbeta = G with G = sum gz, S = sum gz*(x-mean);
//   gx = scale*(gz - G/M - xhat*ggamma/M)  =>  k1 = -scale*invstd^2*S/M,
//   k0 = -scale*G/M - k1*mean.
// Eval: k1 = k0 = 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_two_pass(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool training) {
  auto [gamma, beta] = bn_relu_backward_checks(grad_out, x, mean, invstd, weight, bias);
  at::Tensor scale = gamma * invstd;
  at::Tensor shift = beta - mean * scale;
  static auto reduce_op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("fused_preact::bn_relu_backward_reduce", "")
                              .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                        const at::Tensor&, const at::Tensor&,
                                                                        const at::Tensor&)>();
  static auto apply_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_preact::bn_relu_backward_apply", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  auto [sum_gz, sum_gz_xc] = reduce_op.call(grad_out, x, mean, scale, shift);
  at::Tensor grad_weight = sum_gz_xc * invstd;
  at::Tensor grad_bias = sum_gz;
  at::Tensor k1, k0;
  if (training) {
    // SymInt arithmetic keeps this composite traceable with dynamic shapes.
    const c10::Scalar count(x.sym_numel() / x.sym_size(1));
    k1 = -scale * invstd * grad_weight / count;
    k0 = -scale * sum_gz / count - k1 * mean;
  } else {
    k1 = at::zeros_like(mean);
    k0 = at::zeros_like(mean);
  }
  at::Tensor grad_x = apply_op.call(grad_out, x, scale, shift, k1, k0);
  return {grad_x, grad_weight, grad_bias};
}

void check_running_stats_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                                const at::Tensor& mean, const at::Tensor& var, int64_t count) {
  const char* op = "fused_preact::update_running_stats";
  TORCH_CHECK(count > 1, op, ": need more than one value per channel to update the running variance, got ",
              count);
  TORCH_CHECK(running_mean.sizes() == mean.sizes() && running_var.sizes() == var.sizes(), op,
              ": running stats of shape ", running_mean.sizes(), " do not match batch stats of shape ",
              mean.sizes());
  for (const at::Tensor* t : {&running_var, &mean, &var})
    TORCH_CHECK(t->device() == running_mean.device(), op, ": running stats and batch stats must be on one device, got ",
                running_mean.device(), " and ", t->device());
}

// bn_relu_backward writing grad_x over grad_out (for callers that own
// grad_out): every device, via the two passes and a copy; CPU registers a
// kernel that writes in place (cpu/bn_relu_cpu.cpp).
std::tuple<at::Tensor, at::Tensor> bn_relu_backward_inplace_generic(
    at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool training) {
  auto [grad_x, grad_weight, grad_bias] = bn_relu_backward_two_pass(grad_out, x, mean, invstd, weight, bias, training);
  grad_out.copy_(grad_x);
  return {grad_weight, grad_bias};
}

// running_mean <- (1 - m) * running_mean + m * mean
// running_var  <- (1 - m) * running_var  + m * var * M / (M - 1)   (unbiased)
void update_running_stats_generic(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                  const at::Tensor& var, double momentum, int64_t count) {
  check_running_stats_update(running_mean, running_var, mean, var, count);
  at::NoGradGuard no_grad;
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  // Computed in the batch stats' precision (fp32), stored in the buffers' dtype.
  running_mean.copy_(running_mean.to(mean.scalar_type()) * (1.0 - momentum) + mean * momentum);
  running_var.copy_(running_var.to(var.scalar_type()) * (1.0 - momentum) + var * (momentum * unbias));
}
}  // namespace fused_preact

TORCH_LIBRARY(fused_preact, m) {
  // Per-channel batch mean and biased variance of x (Chan-merged partials,
  // stable for |mean| >> std). Returns (mean, var) in fp32 (fp64 for fp64 x).
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  // a = relu(x * scale + shift) [+ residual], one read of x, one write of a;
  // the output keeps x's memory format. residual is added after the ReLU
  // (the "ReLU before addition" placement).
  m.def("bn_relu(Tensor x, Tensor scale, Tensor shift, Tensor? residual=None) -> Tensor");
  // Backward of bn_relu-after-batch-norm, recomputing the ReLU mask from x.
  m.def(
      "bn_relu_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
      "bool training) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // Its two passes, per device: per-channel (sum gz, sum gz*(x-mean)) ...
  m.def(
      "bn_relu_backward_reduce(Tensor grad_out, Tensor x, Tensor mean, Tensor scale, Tensor shift) "
      "-> (Tensor sum_gz, Tensor sum_gz_xc)");
  // bn_relu_backward with grad_x written over grad_out (one activation-sized
  // tensor less at the backward's peak); returns the gamma/beta gradients.
  m.def(
      "bn_relu_backward_(Tensor(a!) grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor? bias, bool training) -> (Tensor grad_weight, Tensor grad_bias)");
  // ... and gx = gz*scale + x*k1 + k0.
  m.def(
      "bn_relu_backward_apply(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, Tensor k1, Tensor k0) "
      "-> Tensor");
  // out = a + b and the per-channel (mean, var) of out, in one pass.
  m.def("add_stats(Tensor a, Tensor b) -> (Tensor out, Tensor mean, Tensor var)");
  // nn.BatchNorm2d's running-statistics update, in place. count = values per
  // channel (N*H*W); momentum is the effective one (1/num_batches_tracked for
  // momentum=None, computed by the caller).
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "float momentum, int count) -> ()");
}

TORCH_LIBRARY_IMPL(fused_preact, CompositeExplicitAutograd, m) {
  // Every device: the reduce op, then the apply op (bn_relu_backward_: the
  // same and a copy). CPU registers its own kernels for both and for
  // update_running_stats (cpu/bn_relu_cpu.cpp), falling back to these for
  // empty or differently laid out tensors.
  m.impl("bn_relu_backward", &fused_preact::bn_relu_backward_two_pass);
  m.impl("bn_relu_backward_", &fused_preact::bn_relu_backward_inplace_generic);
  m.impl("update_running_stats", &fused_preact::update_running_stats_generic);
}
