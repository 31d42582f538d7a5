// CPU kernels of the fused_preact batch-norm / ReLU / residual ops.
//
// Two dense layouts, two loop shapes:
//   NCHW           one (n, c) plane of H*W contiguous values at a time; the
//                  plane's channel constants are scalars broadcast to a vector.
//   channels-last  rows of C contiguous values (one row per n, h, w); the
//                  per-channel constants are vectors loaded alongside.
// Reductions are two-level: a plane or a chunk of rows is reduced in the
// input's compute type (fp32 for fp32/bf16/fp16) with ATen's Vectorized<T>,
// and the per-plane/per-chunk partials are merged per channel in double
// (Chan's formula for variances). Elementwise passes run over planes or rows
// with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "../fused_preact.h"

namespace fused_preact {
namespace {

using at::vec::Vectorized;

// Loads/stores Vec::size() values of scalar_t as the compute type acc_t
// (float for float/bf16/half, double for double): fp32 accumulation, cast
// only on store.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kSize = Vec::size();
  static Vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec out;
      at::vec::load_to_float<scalar_t>(p, out);
      return out;
    }
  }
  static void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p);
    } else {
      // convert_from_float packs two float vectors into one reduced vector of
      // 2*kSize lanes; store its first kSize.
      at::vec::convert_from_float<scalar_t>(v, v).store(p, kSize);
    }
  }
};

template <typename acc_t>
acc_t reduce_add(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t s = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) s += lanes[i];
  return s;
}

// Rows per chunk for channels-last reductions: about 16K values, so a chunk's
// second pass re-reads it from L2 rather than from memory.
int64_t chunk_rows(int64_t channels) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(channels, 1)); }

// ---------------------------------------------------------------- statistics

// Plane reductions keep kUnroll independent vector accumulators: with one,
// every add waits for the previous one (4 cycles of latency), which made the
// statistics pass about 2x slower than torch's sum over the same data.
constexpr int64_t kUnroll = 4;

template <typename acc_t>
acc_t reduce_add(const Vectorized<acc_t> (&acc)[kUnroll]) {
  return reduce_add((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// (mean, M2) of one contiguous run of values: mean first, then the centred
// sum of squares, both in the compute type.
template <typename scalar_t>
std::pair<double, double> run_mean_m2(const scalar_t* p, int64_t len) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kStep = kUnroll * IO::kSize;
  Vec vsum[kUnroll] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  int64_t i = 0;
  for (; i + kStep <= len; i += kStep)
    for (int64_t u = 0; u < kUnroll; ++u) vsum[u] += IO::load(p + i + u * IO::kSize);
  for (; i + IO::kSize <= len; i += IO::kSize) vsum[0] += IO::load(p + i);
  acc_t sum = reduce_add(vsum);
  for (; i < len; ++i) sum += static_cast<acc_t>(p[i]);
  const acc_t mean = sum / static_cast<acc_t>(len);
  Vec vm2[kUnroll] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  const Vec vmean(mean);
  i = 0;
  for (; i + kStep <= len; i += kStep)
    for (int64_t u = 0; u < kUnroll; ++u) {
      const Vec d = IO::load(p + i + u * IO::kSize) - vmean;
      vm2[u] = at::vec::fmadd(d, d, vm2[u]);
    }
  for (; i + IO::kSize <= len; i += IO::kSize) {
    const Vec d = IO::load(p + i) - vmean;
    vm2[0] = at::vec::fmadd(d, d, vm2[0]);
  }
  acc_t m2 = reduce_add(vm2);
  for (; i < len; ++i) {
    acc_t d = static_cast<acc_t>(p[i]) - mean;
    m2 += d * d;
  }
  return {static_cast<double>(mean), static_cast<double>(m2)};
}

// Per-channel (mean, M2) of `rows` channels-last rows, written to mean/m2[C].
template <typename scalar_t>
void rows_mean_m2(const scalar_t* p, int64_t rows, int64_t C, typename VecIO<scalar_t>::acc_t* mean,
                  typename VecIO<scalar_t>::acc_t* m2) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  std::fill(mean, mean + C, acc_t(0));
  std::fill(m2, m2 + C, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = p + r * C;
    int64_t c = 0;
    for (; c + IO::kSize <= C; c += IO::kSize) (Vec::loadu(mean + c) + IO::load(row + c)).store(mean + c);
    for (; c < C; ++c) mean[c] += static_cast<acc_t>(row[c]);
  }
  for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<acc_t>(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = p + r * C;
    int64_t c = 0;
    for (; c + IO::kSize <= C; c += IO::kSize) {
      Vec d = IO::load(row + c) - Vec::loadu(mean + c);
      at::vec::fmadd(d, d, Vec::loadu(m2 + c)).store(m2 + c);
    }
    for (; c < C; ++c) {
      acc_t d = static_cast<acc_t>(row[c]) - mean[c];
      m2[c] += d * d;
    }
  }
}

// out = a + b over `len` contiguous values (out may be a or b's twin).
template <typename scalar_t>
void add_run(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t len) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  int64_t i = 0;
  for (; i + IO::kSize <= len; i += IO::kSize) IO::store(out + i, IO::load(a + i) + IO::load(b + i));
  for (; i < len; ++i) out[i] = static_cast<scalar_t>(static_cast<acc_t>(a[i]) + static_cast<acc_t>(b[i]));
}

// Per-channel (mean, biased var) of x; when `b` is given, of out = x + b,
// which is written to `out` in the same pass (the residual add feeding the
// next batch norm).
template <typename scalar_t>
void channel_stats_kernel(const at::Tensor& x, const at::Tensor* b, at::Tensor* out, at::Tensor& mean,
                          at::Tensor& var) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* bp = b ? b->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out ? out->mutable_data_ptr<scalar_t>() : nullptr;
  auto* mean_p = mean.mutable_data_ptr<acc_t>();
  auto* var_p = var.mutable_data_ptr<acc_t>();
  const double count = static_cast<double>(N) * static_cast<double>(HW);

  if (layout_of(x) == Layout::kNCHW) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Welford w;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * HW;
          const scalar_t* plane = xp + off;
          if (bp) {
            add_run(xp + off, bp + off, op + off, HW);
            plane = op + off;
          }
          auto [pm, pm2] = run_mean_m2(plane, HW);
          w.merge(static_cast<double>(HW), pm, pm2);
        }
        mean_p[c] = static_cast<acc_t>(w.mean);
        var_p[c] = static_cast<acc_t>(w.m2 / count);
      }
    });
    return;
  }
  // channels-last: chunks of rows in parallel, partials merged per channel.
  const int64_t M = N * HW, rows_per_chunk = chunk_rows(C);
  const int64_t chunks = (M + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<acc_t> part_mean(chunks * C), part_m2(chunks * C);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * rows_per_chunk, rows = std::min(rows_per_chunk, M - r0);
      const scalar_t* block = xp + r0 * C;
      if (bp) {
        add_run(xp + r0 * C, bp + r0 * C, op + r0 * C, rows * C);
        block = op + r0 * C;
      }
      rows_mean_m2(block, rows, C, part_mean.data() + k * C, part_m2.data() + k * C);
    }
  });
  at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Welford w;
      for (int64_t k = 0; k < chunks; ++k) {
        const double rows = static_cast<double>(std::min(rows_per_chunk, M - k * rows_per_chunk));
        w.merge(rows, part_mean[k * C + c], part_m2[k * C + c]);
      }
      mean_p[c] = static_cast<acc_t>(w.mean);
      var_p[c] = static_cast<acc_t>(w.m2 / count);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_in) {
  check_bn_input(x_in, "fused_preact::bn_stats");
  at::Tensor x = dense(x_in);
  at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(stats_dtype(x)));
  at::Tensor var = at::empty_like(mean);
  if (x.numel() == 0) return {mean.fill_(NAN), var.fill_(NAN)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_stats_cpu", [&] {
    channel_stats_kernel<scalar_t>(x, nullptr, nullptr, mean, var);
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_stats_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  const char* op = "fused_preact::add_stats";
  at::Tensor a, b;
  std::tie(a, b) = checked_dense_pair(a_in, b_in, "b", op);
  at::Tensor out = at::empty_like(a);
  at::Tensor mean = at::empty({a.size(1)}, a.options().dtype(stats_dtype(a)));
  at::Tensor var = at::empty_like(mean);
  if (a.numel() == 0) return {out, mean.fill_(NAN), var.fill_(NAN)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "add_stats_cpu", [&] {
    channel_stats_kernel<scalar_t>(a, &b, &out, mean, var);
  });
  return {out, mean, var};
}

// ---------------------------------------------------------- elementwise maps

// Runs an elementwise kernel over both layouts, in parallel: every
// contiguous run of values that share one channel (an NCHW plane) or every
// row of channels (channels-last). `Kernel` provides:
//   void plane(int64_t offset, int64_t len, int64_t channel)   // NCHW
//   void row(int64_t offset, int64_t C)                        // channels-last
template <typename Kernel>
void for_each_run(const at::Tensor& x, Kernel& kernel) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (layout_of(x) == Layout::kNCHW) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) kernel.plane(p * HW, HW, p % C);
    });
  } else {
    at::parallel_for(0, N * HW, chunk_rows(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) kernel.row(r * C, C);
    });
  }
}

// a = relu(x * scale + shift) [+ residual]
template <typename scalar_t>
struct BnReluApply {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const scalar_t* x;
  const scalar_t* residual;  // may be null
  scalar_t* out;
  const acc_t* scale;
  const acc_t* shift;

  acc_t one(acc_t xv, acc_t s, acc_t b, int64_t i) const {
    acc_t a = std::max(xv * s + b, acc_t(0));
    return residual ? a + static_cast<acc_t>(residual[i]) : a;
  }
  Vec many(const Vec& xv, const Vec& s, const Vec& b, int64_t i) const {
    Vec a = at::vec::maximum(at::vec::fmadd(xv, s, b), Vec(0));
    return residual ? a + IO::load(residual + i) : a;
  }
  void plane(int64_t off, int64_t len, int64_t c) const {
    const Vec s(scale[c]), b(shift[c]);
    int64_t i = 0;
    for (; i + IO::kSize <= len; i += IO::kSize)
      IO::store(out + off + i, many(IO::load(x + off + i), s, b, off + i));
    for (; i < len; ++i) out[off + i] = static_cast<scalar_t>(one(x[off + i], scale[c], shift[c], off + i));
  }
  void row(int64_t off, int64_t C) const {
    int64_t c = 0;
    for (; c + IO::kSize <= C; c += IO::kSize)
      IO::store(out + off + c, many(IO::load(x + off + c), Vec::loadu(scale + c), Vec::loadu(shift + c), off + c));
    for (; c < C; ++c) out[off + c] = static_cast<scalar_t>(one(x[off + c], scale[c], shift[c], off + c));
  }
};

at::Tensor bn_relu_cpu(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
                       const std::optional<at::Tensor>& residual_in) {
  const char* op = "fused_preact::bn_relu";
  check_bn_input(x_in, op);
  check_channel_vectors(x_in, {{&scale, "scale"}, {&shift, "shift"}}, op);
  at::Tensor x = dense(x_in);
  at::Tensor residual;
  if (residual_in.has_value()) {
    check_same_as_x(*residual_in, x, "residual", op);
    residual = residual_in->contiguous(x.suggest_memory_format());
  }
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  at::Tensor s = scale.contiguous(), b = shift.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BnReluApply<scalar_t> kernel{x.const_data_ptr<scalar_t>(),
                                 residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
                                 out.mutable_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(),
                                 b.const_data_ptr<acc_t>()};
    for_each_run(x, kernel);
  });
  return out;
}

// gx = gz * scale + x * k1 + k0,  gz = grad_out * [x * scale + shift > 0]
template <typename scalar_t>
struct BnReluBackwardApply {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const scalar_t* grad_out;
  const scalar_t* x;
  scalar_t* grad_x;
  const acc_t *scale, *shift, *k1, *k0;

  static acc_t one(acc_t g, acc_t xv, acc_t s, acc_t b, acc_t a1, acc_t a0) {
    const acc_t gz = xv * s + b > acc_t(0) ? g : acc_t(0);
    return gz * s + xv * a1 + a0;
  }
  static Vec many(const Vec& g, const Vec& xv, const Vec& s, const Vec& b, const Vec& a1, const Vec& a0) {
    const Vec zero(0);
    const Vec gz = Vec::blendv(zero, g, at::vec::fmadd(xv, s, b) > zero);
    return at::vec::fmadd(gz, s, at::vec::fmadd(xv, a1, a0));
  }
  void plane(int64_t off, int64_t len, int64_t c) const {
    const Vec s(scale[c]), b(shift[c]), a1(k1[c]), a0(k0[c]);
    int64_t i = 0;
    for (; i + IO::kSize <= len; i += IO::kSize)
      IO::store(grad_x + off + i, many(IO::load(grad_out + off + i), IO::load(x + off + i), s, b, a1, a0));
    for (; i < len; ++i)
      grad_x[off + i] = static_cast<scalar_t>(one(grad_out[off + i], x[off + i], scale[c], shift[c], k1[c], k0[c]));
  }
  void row(int64_t off, int64_t C) const {
    int64_t c = 0;
    for (; c + IO::kSize <= C; c += IO::kSize)
      IO::store(grad_x + off + c, many(IO::load(grad_out + off + c), IO::load(x + off + c), Vec::loadu(scale + c),
                                       Vec::loadu(shift + c), Vec::loadu(k1 + c), Vec::loadu(k0 + c)));
    for (; c < C; ++c)
      grad_x[off + c] = static_cast<scalar_t>(one(grad_out[off + c], x[off + c], scale[c], shift[c], k1[c], k0[c]));
  }
};

at::Tensor bn_relu_backward_apply_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& scale,
                                      const at::Tensor& shift, const at::Tensor& k1, const at::Tensor& k0) {
  const char* op = "fused_preact::bn_relu_backward_apply";
  at::Tensor x, grad_out;
  std::tie(x, grad_out) = checked_dense_pair(x_in, grad_out_in, "grad_out", op);
  check_channel_vectors(x, {{&scale, "scale"}, {&shift, "shift"}, {&k1, "k1"}, {&k0, "k0"}}, op);
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return grad_x;
  at::Tensor s = scale.contiguous(), b = shift.contiguous(), a1 = k1.contiguous(), a0 = k0.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu_backward_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BnReluBackwardApply<scalar_t> kernel{grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                         grad_x.mutable_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(),
                                         b.const_data_ptr<acc_t>(), a1.const_data_ptr<acc_t>(),
                                         a0.const_data_ptr<acc_t>()};
    for_each_run(x, kernel);
  });
  return grad_x;
}

// ------------------------------------------------------- backward reduction

// Per-channel sum gz and sum gz * (x - mean) over one run (NCHW plane) or
// one chunk of rows (channels-last).
template <typename scalar_t>
struct BnReluBackwardSums {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const scalar_t* grad_out;
  const scalar_t* x;
  const acc_t *mean, *scale, *shift;

  std::pair<double, double> plane(int64_t off, int64_t len, int64_t c) const {
    const Vec m(mean[c]), s(scale[c]), b(shift[c]), zero(0);
    Vec vg[kUnroll] = {zero, zero, zero, zero}, vgx[kUnroll] = {zero, zero, zero, zero};
    auto accumulate = [&](int64_t i, int64_t u) {
      const Vec xv = IO::load(x + off + i);
      const Vec gz = Vec::blendv(zero, IO::load(grad_out + off + i), at::vec::fmadd(xv, s, b) > zero);
      vg[u] += gz;
      vgx[u] = at::vec::fmadd(gz, xv - m, vgx[u]);
    };
    int64_t i = 0;
    for (; i + kUnroll * IO::kSize <= len; i += kUnroll * IO::kSize)
      for (int64_t u = 0; u < kUnroll; ++u) accumulate(i + u * IO::kSize, u);
    for (; i + IO::kSize <= len; i += IO::kSize) accumulate(i, 0);
    acc_t sg = reduce_add(vg), sgx = reduce_add(vgx);
    for (; i < len; ++i) {
      const acc_t xv = x[off + i];
      const acc_t gz = xv * scale[c] + shift[c] > acc_t(0) ? static_cast<acc_t>(grad_out[off + i]) : acc_t(0);
      sg += gz;
      sgx += gz * (xv - mean[c]);
    }
    return {sg, sgx};
  }
  // Adds the sums of `rows` rows starting at row offset `off` into sg/sgx[C].
  void rows(int64_t off, int64_t rows, int64_t C, acc_t* sg, acc_t* sgx) const {
    const Vec zero(0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t ro = off + r * C;
      int64_t c = 0;
      for (; c + IO::kSize <= C; c += IO::kSize) {
        const Vec xv = IO::load(x + ro + c);
        const Vec z = at::vec::fmadd(xv, Vec::loadu(scale + c), Vec::loadu(shift + c));
        const Vec gz = Vec::blendv(zero, IO::load(grad_out + ro + c), z > zero);
        (Vec::loadu(sg + c) + gz).store(sg + c);
        at::vec::fmadd(gz, xv - Vec::loadu(mean + c), Vec::loadu(sgx + c)).store(sgx + c);
      }
      for (; c < C; ++c) {
        const acc_t xv = x[ro + c];
        const acc_t gz = xv * scale[c] + shift[c] > acc_t(0) ? static_cast<acc_t>(grad_out[ro + c]) : acc_t(0);
        sg[c] += gz;
        sgx[c] += gz * (xv - mean[c]);
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                               const at::Tensor& mean, const at::Tensor& scale,
                                                               const at::Tensor& shift) {
  BackwardReduceArgs a = backward_reduce_args(grad_out_in, x_in, mean, scale, shift);
  const at::Tensor &x = a.x, &grad_out = a.grad_out, &m = a.mean, &s = a.scale, &b = a.shift;
  const at::Tensor &sum_gz = a.sum_gz, &sum_gz_xc = a.sum_gz_xc;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (x.numel() == 0) return {sum_gz, sum_gz_xc};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BnReluBackwardSums<scalar_t> kernel{grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                        m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(),
                                        b.const_data_ptr<acc_t>()};
    auto* sg_out = sum_gz.mutable_data_ptr<acc_t>();
    auto* sgx_out = sum_gz_xc.mutable_data_ptr<acc_t>();
    if (layout_of(x) == Layout::kNCHW) {
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          double sg = 0, sgx = 0;  // planes are merged in double
          for (int64_t n = 0; n < N; ++n) {
            auto [pg, pgx] = kernel.plane((n * C + c) * HW, HW, c);
            sg += pg;
            sgx += pgx;
          }
          sg_out[c] = static_cast<acc_t>(sg);
          sgx_out[c] = static_cast<acc_t>(sgx);
        }
      });
      return;
    }
    const int64_t M = N * HW, rows_per_chunk = chunk_rows(C);
    const int64_t chunks = (M + rows_per_chunk - 1) / rows_per_chunk;
    std::vector<acc_t> part_g(chunks * C, acc_t(0)), part_gx(chunks * C, acc_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * rows_per_chunk;
        kernel.rows(r0 * C, std::min(rows_per_chunk, M - r0), C, part_g.data() + k * C, part_gx.data() + k * C);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double sg = 0, sgx = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        sg += part_g[k * C + c];
        sgx += part_gx[k * C + c];
      }
      sg_out[c] = static_cast<acc_t>(sg);
      sgx_out[c] = static_cast<acc_t>(sgx);
    }
  });
  return {sum_gz, sum_gz_xc};
}

}  // namespace
}  // namespace fused_preact

TORCH_LIBRARY_IMPL(fused_preact, CPU, m) {
  m.impl("bn_stats", &fused_preact::bn_stats_cpu);
  m.impl("bn_relu", &fused_preact::bn_relu_cpu);
  m.impl("bn_relu_backward_reduce", &fused_preact::bn_relu_backward_reduce_cpu);
  m.impl("bn_relu_backward_apply", &fused_preact::bn_relu_backward_apply_cpu);
  m.impl("add_stats", &fused_preact::add_stats_cpu);
}
