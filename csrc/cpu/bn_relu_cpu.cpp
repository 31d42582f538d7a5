// CPU kernels of the fused_preact batch-norm / ReLU / residual ops.
//
// Two dense layouts, two loop shapes:
//   NCHW           one (n, c) plane of H*W contiguous values at a time; the
//                  plane's channel constants are scalars broadcast to a vector.
//   channels-last  rows of C contiguous values (one row per n, h, w), walked
//                  in chunks of rows, per block of channels whose constants
//                  and accumulators stay in vector registers.
// Reductions are two-level: a plane or a chunk of rows is reduced in the
// input's compute type (fp32 for fp32/bf16/fp16) with ATen's Vectorized<T>
// (AVX-512 or AVX2, chosen by setup.py), and the per-plane/per-chunk partials
// are merged per channel in double (Chan's formula for variances).
// Elementwise passes run over planes or chunks of rows with at::parallel_for,
// which needs the build's -fopenmp to use more than one thread.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>
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

// Plane reductions keep kUnroll independent vector accumulators: with one,
// every add waits for the previous one (4 cycles of latency), which made the
// statistics pass about 2x slower than torch's sum over the same data.
constexpr int64_t kUnroll = 4;

// Channels-last loops walk a chunk of rows once per block of channels and
// keep that block's accumulators and per-channel constants in registers
// across the rows (a row-by-row walk over all channels re-loads and re-stores
// them for every row). Calls body(tag, c) with decltype(tag)::value = U for
// blocks of U vectors starting at channel c: kUnroll while whole blocks fit,
// then single vectors, then U = 0 for each remaining scalar channel.
template <int64_t kVecSize, typename Body>
void for_channel_blocks(int64_t C, Body&& body) {
  int64_t c = 0;
  for (; c + kUnroll * kVecSize <= C; c += kUnroll * kVecSize) body(std::integral_constant<int64_t, kUnroll>{}, c);
  for (; c + kVecSize <= C; c += kVecSize) body(std::integral_constant<int64_t, 1>{}, c);
  for (; c < C; ++c) body(std::integral_constant<int64_t, 0>{}, c);
}

// ---------------------------------------------------------------- statistics


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
  for_channel_blocks<IO::kSize>(C, [&](auto tag, int64_t c) {
    constexpr int64_t U = decltype(tag)::value;
    if constexpr (U == 0) {
      acc_t sum = 0;
      for (int64_t r = 0; r < rows; ++r) sum += static_cast<acc_t>(p[r * C + c]);
      const acc_t mu = sum / static_cast<acc_t>(rows);
      acc_t q = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t d = static_cast<acc_t>(p[r * C + c]) - mu;
        q += d * d;
      }
      mean[c] = mu;
      m2[c] = q;
    } else {
      Vec sum[U], mu[U], q[U];
      for (int64_t u = 0; u < U; ++u) sum[u] = q[u] = Vec(0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t u = 0; u < U; ++u) sum[u] += IO::load(p + r * C + c + u * IO::kSize);
      for (int64_t u = 0; u < U; ++u) mu[u] = sum[u] / Vec(static_cast<acc_t>(rows));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t u = 0; u < U; ++u) {
          const Vec d = IO::load(p + r * C + c + u * IO::kSize) - mu[u];
          q[u] = at::vec::fmadd(d, d, q[u]);
        }
      for (int64_t u = 0; u < U; ++u) {
        mu[u].store(mean + c + u * IO::kSize);
        q[u].store(m2 + c + u * IO::kSize);
      }
    }
  });
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
//   void rows(int64_t offset, int64_t rows, int64_t C)         // channels-last
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
      kernel.rows(r0 * C, r1 - r0, C);
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
  void rows(int64_t off, int64_t rows, int64_t C) const {
    for_channel_blocks<IO::kSize>(C, [&](auto tag, int64_t c) {
      constexpr int64_t U = decltype(tag)::value;
      if constexpr (U == 0) {
        for (int64_t r = 0, i = off + c; r < rows; ++r, i += C)
          out[i] = static_cast<scalar_t>(one(x[i], scale[c], shift[c], i));
      } else {
        Vec s[U], b[U];
        for (int64_t u = 0; u < U; ++u) {
          s[u] = Vec::loadu(scale + c + u * IO::kSize);
          b[u] = Vec::loadu(shift + c + u * IO::kSize);
        }
        for (int64_t r = 0, i = off + c; r < rows; ++r, i += C)
          for (int64_t u = 0; u < U; ++u) {
            const int64_t j = i + u * IO::kSize;
            IO::store(out + j, many(IO::load(x + j), s[u], b[u], j));
          }
      }
    });
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
  void rows(int64_t off, int64_t rows, int64_t C) const {
    for_channel_blocks<IO::kSize>(C, [&](auto tag, int64_t c) {
      constexpr int64_t U = decltype(tag)::value;
      if constexpr (U == 0) {
        for (int64_t r = 0, i = off + c; r < rows; ++r, i += C)
          grad_x[i] = static_cast<scalar_t>(one(grad_out[i], x[i], scale[c], shift[c], k1[c], k0[c]));
      } else {
        Vec s[U], b[U], a1[U], a0[U];
        for (int64_t u = 0; u < U; ++u) {
          const int64_t cu = c + u * IO::kSize;
          s[u] = Vec::loadu(scale + cu);
          b[u] = Vec::loadu(shift + cu);
          a1[u] = Vec::loadu(k1 + cu);
          a0[u] = Vec::loadu(k0 + cu);
        }
        for (int64_t r = 0, i = off + c; r < rows; ++r, i += C)
          for (int64_t u = 0; u < U; ++u) {
            const int64_t j = i + u * IO::kSize;
            IO::store(grad_x + j, many(IO::load(grad_out + j), IO::load(x + j), s[u], b[u], a1[u], a0[u]));
          }
      }
    });
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
  // Channel c's sums over its N planes (NCHW), merged in double.
  std::pair<double, double> channel(int64_t c, int64_t N, int64_t C, int64_t HW) const {
    double sg = 0, sgx = 0;
    for (int64_t n = 0; n < N; ++n) {
      auto [pg, pgx] = plane((n * C + c) * HW, HW, c);
      sg += pg;
      sgx += pgx;
    }
    return {sg, sgx};
  }
  // Adds the sums of `rows` rows starting at row offset `off` into sg/sgx[C].
  void rows(int64_t off, int64_t rows, int64_t C, acc_t* sg, acc_t* sgx) const {
    for_channel_blocks<IO::kSize>(C, [&](auto tag, int64_t c) {
      constexpr int64_t U = decltype(tag)::value;
      if constexpr (U == 0) {
        acc_t g = 0, gx = 0;
        for (int64_t r = 0, i = off + c; r < rows; ++r, i += C) {
          const acc_t xv = x[i];
          const acc_t gz = xv * scale[c] + shift[c] > acc_t(0) ? static_cast<acc_t>(grad_out[i]) : acc_t(0);
          g += gz;
          gx += gz * (xv - mean[c]);
        }
        sg[c] += g;
        sgx[c] += gx;
      } else {
        const Vec zero(0);
        Vec s[U], b[U], m[U], g[U], gx[U];
        for (int64_t u = 0; u < U; ++u) {
          const int64_t cu = c + u * IO::kSize;
          s[u] = Vec::loadu(scale + cu);
          b[u] = Vec::loadu(shift + cu);
          m[u] = Vec::loadu(mean + cu);
          g[u] = gx[u] = zero;
        }
        for (int64_t r = 0, i = off + c; r < rows; ++r, i += C)
          for (int64_t u = 0; u < U; ++u) {
            const int64_t j = i + u * IO::kSize;
            const Vec xv = IO::load(x + j);
            const Vec gz = Vec::blendv(zero, IO::load(grad_out + j), at::vec::fmadd(xv, s[u], b[u]) > zero);
            g[u] += gz;
            gx[u] = at::vec::fmadd(gz, xv - m[u], gx[u]);
          }
        for (int64_t u = 0; u < U; ++u) {
          const int64_t cu = c + u * IO::kSize;
          (Vec::loadu(sg + cu) + g[u]).store(sg + cu);
          (Vec::loadu(sgx + cu) + gx[u]).store(sgx + cu);
        }
      }
    });
  }
};

// Per-channel sum gz and sum gz*(x - mean) of dense x/grad_out (either
// layout), merged in double, written to sg_out/sgx_out[C].
template <typename scalar_t>
void backward_sums(const at::Tensor& grad_out, const at::Tensor& x, const at::opmath_type<scalar_t>* mean,
                   const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift,
                   at::opmath_type<scalar_t>* sg_out, at::opmath_type<scalar_t>* sgx_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  BnReluBackwardSums<scalar_t> kernel{grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean,
                                      scale, shift};
  if (layout_of(x) == Layout::kNCHW) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        auto [sg, sgx] = kernel.channel(c, N, C, HW);
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
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                               const at::Tensor& mean, const at::Tensor& scale,
                                                               const at::Tensor& shift) {
  BackwardReduceArgs a = backward_reduce_args(grad_out_in, x_in, mean, scale, shift);
  if (a.x.numel() == 0) return {a.sum_gz, a.sum_gz_xc};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.x.scalar_type(), "bn_relu_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_sums<scalar_t>(a.grad_out, a.x, a.mean.const_data_ptr<acc_t>(), a.scale.const_data_ptr<acc_t>(),
                            a.shift.const_data_ptr<acc_t>(), a.sum_gz.mutable_data_ptr<acc_t>(),
                            a.sum_gz_xc.mutable_data_ptr<acc_t>());
  });
  return {a.sum_gz, a.sum_gz_xc};
}

// ------------------------------------------------------ bn_relu_backward

// The training-mode constants of gx = gz*scale + x*k1 + k0 for one channel
// from its sums (see bn_relu_backward_two_pass for the formula), and the
// gamma/beta gradients. Eval: k1 = k0 = 0.
template <typename acc_t>
void channel_backward_constants(int64_t c, double sg, double sgx, double count, bool training, const acc_t* mean,
                                const acc_t* invstd, const acc_t* scale, acc_t* gw, acc_t* gb, acc_t* k1,
                                acc_t* k0) {
  const double ggamma = sgx * static_cast<double>(invstd[c]);
  gw[c] = static_cast<acc_t>(ggamma);
  gb[c] = static_cast<acc_t>(sg);
  if (!training) return;
  const double a1 = -static_cast<double>(scale[c]) * static_cast<double>(invstd[c]) * ggamma / count;
  k1[c] = static_cast<acc_t>(a1);
  k0[c] = static_cast<acc_t>(-static_cast<double>(scale[c]) * sg / count - a1 * static_cast<double>(mean[c]));
}

// bn_relu_backward on CPU: all of it in this function, no per-channel vector
// ops dispatched one by one (the device-generic two-pass version makes about
// fifteen, each an op call's worth of host time).
//   NCHW with >= 2 channels per thread: one sweep, each channel's reduce and
//     apply back to back: the channel's N planes of (grad_out, x) are summed,
//     then mapped to grad_x while they are still in this core's L2 cache, so
//     memory sees one read of grad_out and x instead of two (the planes take
//     N*H*W*2 values: 256 KB for 32x64x32x32 float32, against 2 MB of L2).
//   Otherwise (channels-last rows interleave every channel; few channels):
//     the reduce over all of x, the per-channel constants, then the apply.
template <typename scalar_t>
void bn_relu_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                             const at::Tensor& invstd, const at::Tensor& scale, const at::Tensor& shift,
                             bool training, at::Tensor& grad_x, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const double count = static_cast<double>(N) * static_cast<double>(HW);
  const acc_t* m = mean.const_data_ptr<acc_t>();
  const acc_t* inv = invstd.const_data_ptr<acc_t>();
  const acc_t* s = scale.const_data_ptr<acc_t>();
  const acc_t* b = shift.const_data_ptr<acc_t>();
  acc_t* gw = grad_weight.mutable_data_ptr<acc_t>();
  acc_t* gb = grad_bias.mutable_data_ptr<acc_t>();
  std::vector<acc_t> k1(C, acc_t(0)), k0(C, acc_t(0));
  BnReluBackwardApply<scalar_t> apply{grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                      grad_x.mutable_data_ptr<scalar_t>(), s, b, k1.data(), k0.data()};
  if (layout_of(x) == Layout::kNCHW && C >= 2 * at::get_num_threads()) {
    BnReluBackwardSums<scalar_t> sums{grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), m, s, b};
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        auto [sg, sgx] = sums.channel(c, N, C, HW);
        channel_backward_constants(c, sg, sgx, count, training, m, inv, s, gw, gb, k1.data(), k0.data());
        for (int64_t n = 0; n < N; ++n) apply.plane((n * C + c) * HW, HW, c);
      }
    });
    return;
  }
  std::vector<acc_t> sg(C), sgx(C);
  backward_sums<scalar_t>(grad_out, x, m, s, b, sg.data(), sgx.data());
  for (int64_t c = 0; c < C; ++c)
    channel_backward_constants(c, static_cast<double>(sg[c]), static_cast<double>(sgx[c]), count, training, m, inv,
                               s, gw, gb, k1.data(), k0.data());
  for_each_run(x, apply);
}

// bn_relu_backward of checked, dense x and grad_out in x's layout, grad_x
// written to `grad_x` (a fresh tensor, or grad_out itself: every value of
// grad_x is written after the last read of the grad_out value at the same
// index, since a channel's sums are complete before its apply starts and the
// apply reads and writes index by index). Returns (grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor> bn_relu_backward_into(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                                         const at::Tensor& gamma, const at::Tensor& beta,
                                                         bool training, at::Tensor& grad_x) {
  at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  // The same ATen expressions as the forward's scale/shift, so the ReLU mask
  // recomputed here is bit-identical to the forward's.
  at::Tensor scale = (gamma * invstd).contiguous();
  at::Tensor shift = (beta - mean * scale).contiguous();
  at::Tensor grad_weight = at::empty_like(mean), grad_bias = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu_backward_cpu", [&] {
    bn_relu_backward_kernel<scalar_t>(grad_out, x, mean, invstd, scale, shift, training, grad_x, grad_weight,
                                      grad_bias);
  });
  return {grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool training) {
  auto [gamma, beta] = bn_relu_backward_checks(grad_out_in, x_in, mean, invstd, weight, bias);
  if (x_in.numel() == 0)
    return bn_relu_backward_two_pass(grad_out_in, x_in, mean, invstd, weight, bias, training);
  at::Tensor x, grad_out;
  std::tie(x, grad_out) = checked_dense_pair(x_in, grad_out_in, "grad_out", "fused_preact::bn_relu_backward");
  at::Tensor grad_x = at::empty_like(x);
  auto [grad_weight, grad_bias] = bn_relu_backward_into(grad_out, x, mean, invstd, gamma, beta, training, grad_x);
  return {grad_x, grad_weight, grad_bias};
}

// bn_relu_backward_: grad_x written over grad_out where grad_out is x's
// dense twin; otherwise two passes and a copy.
std::tuple<at::Tensor, at::Tensor> bn_relu_backward_inplace_cpu(
    at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool training) {
  auto [gamma, beta] = bn_relu_backward_checks(grad_out, x_in, mean, invstd, weight, bias);
  const at::Tensor x = dense(x_in);
  if (x.numel() == 0 || grad_out.strides() != x.strides())
    return bn_relu_backward_inplace_generic(grad_out, x_in, mean, invstd, weight, bias, training);
  return bn_relu_backward_into(grad_out, x, mean, invstd, gamma, beta, training, grad_out);
}

// nn.BatchNorm2d's running-statistics update (see update_running_stats in
// fused_preact.cpp) as one loop over the channels instead of eight tensor ops.
void update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean_in,
                              const at::Tensor& var_in, double momentum, int64_t count) {
  check_running_stats_update(running_mean, running_var, mean_in, var_in, count);
  const bool one_loop = running_mean.is_contiguous() && running_var.is_contiguous() &&
                        running_mean.scalar_type() == running_var.scalar_type() &&
                        mean_in.scalar_type() == var_in.scalar_type();
  if (!one_loop) {
    return update_running_stats_generic(running_mean, running_var, mean_in, var_in, momentum, count);
  }
  const at::Tensor mean = mean_in.contiguous(), var = var_in.contiguous();
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  const int64_t C = mean.numel();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "update_running_stats_cpu", [&] {
    using stat_t = scalar_t;  // the batch statistics' precision (fp32, or fp64)
    const stat_t* mp = mean.const_data_ptr<stat_t>();
    const stat_t* vp = var.const_data_ptr<stat_t>();
    const stat_t keep = static_cast<stat_t>(1.0 - momentum), take = static_cast<stat_t>(momentum);
    const stat_t take_var = static_cast<stat_t>(momentum * unbias);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "update_running_stats_cpu",
                                    [&] {
      scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
      scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        // Rounded like the tensor expressions: each product, then the sum.
        const stat_t old_mean = static_cast<stat_t>(rm[c]) * keep, new_mean = mp[c] * take;
        const stat_t old_var = static_cast<stat_t>(rv[c]) * keep, new_var = vp[c] * take_var;
        rm[c] = static_cast<scalar_t>(old_mean + new_mean);
        rv[c] = static_cast<scalar_t>(old_var + new_var);
      }
    });
  });
}

}  // namespace
}  // namespace fused_preact

TORCH_LIBRARY_IMPL(fused_preact, CPU, m) {
  m.impl("bn_relu_backward", &fused_preact::bn_relu_backward_cpu);
  m.impl("bn_relu_backward_", &fused_preact::bn_relu_backward_inplace_cpu);
  m.impl("update_running_stats", &fused_preact::update_running_stats_cpu);
  m.impl("bn_stats", &fused_preact::bn_stats_cpu);
  m.impl("bn_relu", &fused_preact::bn_relu_cpu);
  m.impl("bn_relu_backward_reduce", &fused_preact::bn_relu_backward_reduce_cpu);
  m.impl("bn_relu_backward_apply", &fused_preact::bn_relu_backward_apply_cpu);
  m.impl("add_stats", &fused_preact::add_stats_cpu);
}
