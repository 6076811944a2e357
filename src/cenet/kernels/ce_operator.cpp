// The CE block's small graph in training (CE paper, Eqns 4-8, 21) and its hand-derived
// backward, as two ops: the Newton iteration and the elementwise steps as loops, the gate
// through ir_gate (cenet_kernels.h, shared with eval), its backward's four products through
// at::mm. The Python graph of the same computation is about 100 small
// autograd nodes, whose dispatch costs more than their arithmetic at C = 256 (1.2 ms against
// 0.25 ms per step, forward and backward).
//
//   ce_operator(mean_bd (N,C), second (G,g,g), mean_ir (N,C), sq_ir (N,C), theta (1),
//               fc1 (Hd,C), ln_w (Hd), ln_b (Hd), fc2 (C,Hd), eps_bd, eps_ir, ln_eps, T)
//     -> (λW (G,g,g), (1-λ)d (N,C), W (G,g,g), inv_std (1), finite (bool), saved...)
//   BD: Σ = E[x xᵀ] - μμᵀ + ε_bd I (μ the batch mean of the group), Σ_N = Σ / tr Σ,
//       P_1 = (3I - Σ_N) / 2, P_k = (3 P - P³ Σ_N) / 2, W = P_T  (Eqns 5, 6)
//   IR: σ² = max(E[x²] - E[x]², 0) per sample and channel, s = mean σ², inv_std = (s+ε)^-1/2,
//       d = sigmoid(fc2 ReLU(LN(fc1 σ²))) · inv_std  (Eqns 7, 8, 21)
//   λ = sigmoid(θ): outputs λW and (1-λ)d (Eqn 4); W and inv_std for the running estimates,
//   finite: Σ and inv_std are finite (the caller raises before touching a running buffer).
//   ce_operator_backward(grad λW, grad (1-λ)d, inputs..., saved...) -> the gradients of
//   mean_bd, second, mean_ir, sq_ir, theta, fc1, ln_w, ln_b, fc2.
//
// All tensors of one dtype (float32 or float64); no autograd. C++ functions of namespace
// CENET_NS (cenet_kernels.h): ce_step.cpp chains them with the products of block_ops.cpp.

#include "cenet_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace CENET_NS {
namespace {

using at::Tensor;

// Small square matrices (g x g, row-major) for the Newton iteration: C = A B, and the transpose.
// The inner loop runs along a row of B and C, which the compiler vectorizes.
template <typename T, int G>
void matmul_fixed(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c) {
  typedef T V __attribute__((vector_size(G * sizeof(T))));  // one row
  static_assert(sizeof(V) == G * sizeof(T), "matmul_fixed: a row must be one vector");
  V rows[G];
  std::memcpy(rows, b, sizeof(rows));
  for (int i = 0; i < G; ++i) {
    V acc = rows[0] * a[i * G];
    for (int k = 1; k < G; ++k) acc += rows[k] * a[i * G + k];
    std::memcpy(c + i * G, &acc, sizeof(acc));
  }
}

template <typename T>
void matmul(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c, int64_t g) {
  if (g == 16) return matmul_fixed<T, 16>(a, b, c);
  if (g == 8) return matmul_fixed<T, 8>(a, b, c);
  if (g == 32) return matmul_fixed<T, 32>(a, b, c);
  for (int64_t i = 0; i < g; ++i) {
    T* ci = c + i * g;
    for (int64_t j = 0; j < g; ++j) ci[j] = 0;
    for (int64_t k = 0; k < g; ++k) {
      const T aik = a[i * g + k];
      const T* bk = b + k * g;
      for (int64_t j = 0; j < g; ++j) ci[j] += aik * bk[j];
    }
  }
}

template <typename T>
void transpose(const T* a, T* at, int64_t g) {
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < g; ++j) at[j * g + i] = a[i * g + j];
}

// BD of one group (Eqns 5, 6): Σ = second - μμᵀ + εI, Σ_N = Σ / tr Σ, P_1 = (3I - Σ_N) / 2,
// P_{k+1} = (3 P_k - P_k³ Σ_N) / 2; writes Σ_N, P_1 .. P_T (ps, T matrices apart by pstride)
// and returns tr Σ; finite is cleared if Σ is not finite.
template <typename T>
T newton_group(const T* second, const T* mu, double eps, int64_t g, int64_t num_iters, T* sn,
               T* ps, int64_t pstride, bool& finite) {
  T trace = 0;
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < g; ++j) {
      const T v = second[i * g + j] - mu[i] * mu[j] + (i == j ? T(eps) : T(0));
      finite = finite && std::isfinite(v);
      sn[i * g + j] = v;
      if (i == j) trace += v;
    }
  for (int64_t i = 0; i < g * g; ++i) sn[i] /= trace;
  for (int64_t i = 0; i < g * g; ++i) ps[i] = T(-0.5) * sn[i] + (i % (g + 1) == 0 ? T(1.5) : T(0));
  std::vector<T> p2(g * g), p3(g * g), t(g * g);
  for (int64_t k = 1; k < num_iters; ++k) {
    const T* p = ps + (k - 1) * pstride;
    matmul(p, p, p2.data(), g);
    matmul(p2.data(), p, p3.data(), g);
    matmul(p3.data(), sn, t.data(), g);
    T* next = ps + k * pstride;
    for (int64_t i = 0; i < g * g; ++i) next[i] = T(1.5) * p[i] - T(0.5) * t[i];
  }
  return trace;
}

// The backward of newton_group: from grad_p (dL/dP_T, overwritten) the gradient of second
// (grad_second) and dL/dμ (grad_mu), through P_T .. P_1, Σ_N = Σ / tr Σ and Σ = second - μμᵀ.
template <typename T>
void newton_group_backward(T* grad_p, const T* sn, T trace, const T* mu, const T* ps,
                           int64_t pstride, int64_t g, int64_t num_iters, T* grad_second,
                           T* grad_mu) {
  const int64_t gg = g * g;
  std::vector<T> buf(9 * gg, T(0));
  T *gsn = buf.data(), *p2 = gsn + gg, *p3 = p2 + gg, *pt = p3 + gg, *p2t = pt + gg,
    *gp3 = p2t + gg, *tmp = gp3 + gg, *tmp2 = tmp + gg, *mt = tmp2 + gg;
  transpose(sn, mt, g);  // Σ_Nᵀ
  for (int64_t k = num_iters - 1; k >= 1; --k) {  // P_{k+1} = 1.5 P_k - 0.5 P_k³ Σ_N
    const T* p = ps + (k - 1) * pstride;
    matmul(p, p, p2, g);
    matmul(p2, p, p3, g);
    matmul(grad_p, mt, gp3, g);  // d/dP³ = -0.5 dP_{k+1} Σ_Nᵀ
    for (int64_t i = 0; i < gg; ++i) gp3[i] *= T(-0.5);
    transpose(p3, tmp, g);  // d/dΣ_N += -0.5 (P³)ᵀ dP_{k+1}
    matmul(tmp, grad_p, tmp2, g);
    for (int64_t i = 0; i < gg; ++i) gsn[i] -= T(0.5) * tmp2[i];
    // d/dP_k = 1.5 dP_{k+1} + dP³ (P²)ᵀ + Pᵀ dP³ Pᵀ + (P²)ᵀ dP³
    transpose(p, pt, g);
    transpose(p2, p2t, g);
    for (int64_t i = 0; i < gg; ++i) grad_p[i] *= T(1.5);
    matmul(gp3, p2t, tmp, g);
    for (int64_t i = 0; i < gg; ++i) grad_p[i] += tmp[i];
    matmul(pt, gp3, tmp, g);
    matmul(tmp, pt, tmp2, g);
    for (int64_t i = 0; i < gg; ++i) grad_p[i] += tmp2[i];
    matmul(p2t, gp3, tmp, g);
    for (int64_t i = 0; i < gg; ++i) grad_p[i] += tmp[i];
  }
  for (int64_t i = 0; i < gg; ++i) gsn[i] -= T(0.5) * grad_p[i];  // P_1 = 1.5 I - 0.5 Σ_N
  T dot = 0;  // Σ_N = Σ / tr Σ: dΣ = dΣ_N / tr - <dΣ_N, Σ_N> / tr I
  for (int64_t i = 0; i < gg; ++i) dot += gsn[i] * sn[i];
  for (int64_t i = 0; i < gg; ++i)
    grad_second[i] = gsn[i] / trace - (i % (g + 1) == 0 ? dot / trace : T(0));
  for (int64_t i = 0; i < g; ++i) {  // Σ = second - μμᵀ: dμ = -(dΣ + dΣᵀ) μ
    T acc = 0;
    for (int64_t j = 0; j < g; ++j)
      acc += (grad_second[i * g + j] + grad_second[j * g + i]) * mu[j];
    grad_mu[i] = -acc;
  }
}

}  // namespace

std::vector<Tensor> ce_operator(const Tensor& mean_bd, const Tensor& second,
                                const Tensor& mean_ir, const Tensor& sq_ir, const Tensor& theta,
                                const Tensor& fc1, const Tensor& ln_w, const Tensor& ln_b,
                                const Tensor& fc2, double eps_bd, double eps_ir, double ln_eps,
                                int64_t num_iters) {
  TORCH_CHECK(num_iters >= 1, "ce_operator: num_iters must be >= 1, got ", num_iters);
  TORCH_CHECK(second.dim() == 3 && second.size(1) == second.size(2),
              "ce_operator: expected second (G,g,g), got ", second.sizes());
  const int64_t groups = second.size(0), g = second.size(1);
  const int64_t c = mean_bd.size(1);
  TORCH_CHECK(groups * g == c && mean_ir.sizes() == sq_ir.sizes() && mean_ir.size(1) == c,
              "ce_operator: expected moments (N,C) with C = G*g, got ", mean_bd.sizes(), ", ",
              second.sizes(), ", ", mean_ir.sizes(), ", ", sq_ir.sizes());
  for (const Tensor* t : {&second, &mean_ir, &sq_ir, &theta, &fc1, &ln_w, &ln_b, &fc2})
    TORCH_CHECK(t->scalar_type() == mean_bd.scalar_type(), "ce_operator: dtypes differ");
  // BD (Eqns 5, 6), group by group
  const Tensor mu = mean_bd.mean(0).view({groups, g, 1});
  const Tensor sec = second.contiguous();
  const Tensor sn = at::empty({groups, g, g}, sec.options());
  const Tensor trace = at::empty({groups}, sec.options());
  const Tensor ps = at::empty({num_iters, groups, g, g}, sec.options());  // P_1 .. P_T
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(sec.scalar_type(), "ce_operator", [&] {
    using T = scalar_t;
    for (int64_t j = 0; j < groups; ++j)
      trace.data_ptr<T>()[j] = newton_group<T>(
          sec.data_ptr<T>() + j * g * g, mu.data_ptr<T>() + j * g, eps_bd, g, num_iters,
          sn.data_ptr<T>() + j * g * g, ps.data_ptr<T>() + j * g * g, groups * g * g, finite);
  });
  const Tensor wm = ps[num_iters - 1];
  // IR (Eqns 7, 8, 21): the elementwise steps as loops (each would be an ATen call)
  const Tensor m_ir = mean_ir.contiguous(), q_ir = sq_ir.contiguous();
  const Tensor raw = at::empty_like(m_ir), var = at::empty_like(m_ir);
  const int64_t n = m_ir.size(0), hd = fc1.size(0);
  const double lam = 1 / (1 + std::exp(-theta.item<double>()));
  double inv_std = 0;
  AT_DISPATCH_FLOATING_TYPES(m_ir.scalar_type(), "ce_operator", [&] {
    const scalar_t *mp = m_ir.data_ptr<scalar_t>(), *qp = q_ir.data_ptr<scalar_t>();
    scalar_t *rp = raw.data_ptr<scalar_t>(), *vp = var.data_ptr<scalar_t>();
    double total = 0;
    for (int64_t i = 0; i < n * c; ++i) {
      rp[i] = qp[i] - mp[i] * mp[i];
      vp[i] = rp[i] > 0 ? rp[i] : scalar_t(0);
      total += vp[i];
    }
    inv_std = double(scalar_t(1) / std::sqrt(scalar_t(total / (n * c)) + scalar_t(eps_ir)));
  });
  // the gate (Eqns 8, 21; ir_gate, as in eval), keeping xhat and rstd for the backward
  const Tensor xhat = at::empty({n, hd}, m_ir.options()), r = at::empty_like(xhat);
  const Tensor rstd = at::empty({n, 1}, m_ir.options()), gate = at::empty_like(m_ir);
  AT_DISPATCH_FLOATING_TYPES(m_ir.scalar_type(), "ce_operator", [&] {
    using T = scalar_t;
    const Tensor f1 = fc1.contiguous(), f2 = fc2.contiguous();
    const Tensor w = ln_w.contiguous(), b = ln_b.contiguous();
    ir_gate<T>(var.data_ptr<T>(), n, c, f1.data_ptr<T>(), w.data_ptr<T>(), b.data_ptr<T>(),
               T(ln_eps), f2.data_ptr<T>(), hd, T(1), r.data_ptr<T>(), gate.data_ptr<T>(),
               xhat.data_ptr<T>(), rstd.data_ptr<T>());
  });
  const Tensor d_mixed = gate * (inv_std * (1 - lam));
  finite = finite && std::isfinite(inv_std);
  const auto scalar = [&](double v) { return at::full({1}, v, sn.options()); };
  std::vector<Tensor> out{wm * lam, d_mixed, wm, scalar(inv_std),
                          at::scalar_tensor(finite, at::kBool),
                          // saved for backward
                          sn, trace, mu, raw, var, xhat, rstd, r, gate, scalar(lam), ps};
  return out;
}

std::vector<Tensor> ce_operator_backward(const Tensor& grad_wm, const Tensor& grad_d,
                                         const Tensor& mean_ir, const Tensor& fc1,
                                         const Tensor& ln_w, const Tensor& fc2,
                                         const std::vector<Tensor>& forward_out) {
  TORCH_CHECK(forward_out.size() == 16, "ce_operator_backward: expected ce_operator's outputs");
  const Tensor &wm = forward_out[2], &inv_std = forward_out[3], &sn = forward_out[5],
               &trace = forward_out[6], &mu = forward_out[7], &raw = forward_out[8],
               &var = forward_out[9], &xhat = forward_out[10], &rstd = forward_out[11],
               &r = forward_out[12], &gate = forward_out[13], &lam_t = forward_out[14];
  const Tensor& ps = forward_out[15];
  const int64_t num_iters = ps.size(0);
  const int64_t n = var.size(0), c = var.size(1);
  const int64_t groups = sn.size(0), g = sn.size(1);
  const double lam = lam_t.item<double>(), inv = inv_std.item<double>();
  const int64_t hd = fc1.size(0);
  const Tensor gd = grad_d.contiguous(), gw = grad_wm.contiguous();
  const Tensor grad_z = at::empty_like(gate);
  double grad_lam = 0, grad_inv = 0;
  AT_DISPATCH_FLOATING_TYPES(gate.scalar_type(), "ce_operator_backward", [&] {
    using T = scalar_t;
    const T *gdp = gd.data_ptr<T>(), *gp = gate.data_ptr<T>();
    T* zp = grad_z.data_ptr<T>();
    double lam_d = 0, g_inv = 0;
    for (int64_t i = 0; i < n * c; ++i) {  // d = (1 - λ) gate inv_std (Eqns 4, 8)
      lam_d += double(gdp[i]) * gp[i];
      const T gdraw = gdp[i] * T(1 - lam);
      g_inv += double(gdraw) * gp[i];
      zp[i] = gdraw * T(inv) * gp[i] * (T(1) - gp[i]);
    }
    const Tensor wc = wm.contiguous();
    const T *gwp = gw.data_ptr<T>(), *wp = wc.data_ptr<T>();
    double lam_w = 0;
    for (int64_t i = 0; i < wc.numel(); ++i) lam_w += double(gwp[i]) * wp[i];
    grad_lam = lam_w - lam_d * inv;
    grad_inv = g_inv;
  });
  const Tensor grad_theta = at::full({1}, grad_lam * lam * (1 - lam), gate.options());
  const Tensor grad_fc2 = at::mm(grad_z.t(), r);
  const Tensor grad_r = at::mm(grad_z, fc2);
  const Tensor grad_ln_w = at::zeros({hd}, gate.options()), grad_ln_b = at::zeros_like(grad_ln_w);
  const Tensor grad_h1 = at::empty_like(grad_r);
  AT_DISPATCH_FLOATING_TYPES(gate.scalar_type(), "ce_operator_backward", [&] {
    using T = scalar_t;
    const Tensor w = ln_w.contiguous();
    const T *grp = grad_r.data_ptr<T>(), *rp = r.data_ptr<T>(), *xp = xhat.data_ptr<T>(),
            *sp = rstd.data_ptr<T>(), *wp = w.data_ptr<T>();
    T *gwp = grad_ln_w.data_ptr<T>(), *gbp = grad_ln_b.data_ptr<T>(), *ghp = grad_h1.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) {  // ReLU, then LayerNorm backward, row by row
      const T* x = xp + i * hd;
      T* gh = ghp + i * hd;
      T s1 = 0, s2 = 0;
      for (int64_t j = 0; j < hd; ++j) {
        const T gl = rp[i * hd + j] > 0 ? grp[i * hd + j] : T(0);
        gwp[j] += gl * x[j];
        gbp[j] += gl;
        gh[j] = gl * wp[j];
        s1 += gh[j];
        s2 += gh[j] * x[j];
      }
      s1 /= hd;
      s2 /= hd;
      for (int64_t j = 0; j < hd; ++j) gh[j] = sp[i] * (gh[j] - s1 - x[j] * s2);
    }
  });
  const Tensor grad_fc1 = at::mm(grad_h1.t(), var);
  const Tensor grad_var = at::mm(grad_h1, fc1);
  const Tensor grad_mean_ir = at::empty_like(grad_var);
  AT_DISPATCH_FLOATING_TYPES(gate.scalar_type(), "ce_operator_backward", [&] {
    using T = scalar_t;
    const Tensor mc = mean_ir.contiguous();
    const T *rawp = raw.data_ptr<T>(), *mp = mc.data_ptr<T>();
    T *gvp = grad_var.data_ptr<T>(), *gmp = grad_mean_ir.data_ptr<T>();
    // s = mean σ², inv_std = (s + ε)^-1/2: d inv_std / ds = -inv_std³ / 2
    const T k = T(grad_inv * inv * inv * inv * (-0.5 / (n * c)));
    for (int64_t i = 0; i < n * c; ++i) {
      const T gv = rawp[i] >= 0 ? gvp[i] + k : T(0);  // clamp at 0 (Eqn 7)
      gvp[i] = gv;
      gmp[i] = -2 * mp[i] * gv;
    }
  });
  // BD: back through the Newton steps, group by group
  const Tensor grad_p = gw * lam;  // a new tensor, overwritten
  const Tensor grad_cov = at::empty_like(sn), grad_mu = at::empty({groups, g}, sn.options());
  AT_DISPATCH_FLOATING_TYPES(sn.scalar_type(), "ce_operator_backward", [&] {
    using T = scalar_t;
    for (int64_t j = 0; j < groups; ++j)
      newton_group_backward<T>(grad_p.data_ptr<T>() + j * g * g, sn.data_ptr<T>() + j * g * g,
                               trace.data_ptr<T>()[j], mu.data_ptr<T>() + j * g,
                               ps.data_ptr<T>() + j * g * g, groups * g * g, g, num_iters,
                               grad_cov.data_ptr<T>() + j * g * g, grad_mu.data_ptr<T>() + j * g);
  });
  // μ = mean over the batch of mean_bd
  const Tensor grad_mean_bd = (grad_mu.view({1, c}) / n).expand({n, c}).contiguous();
  return {grad_mean_bd, grad_cov, grad_mean_ir, grad_var, grad_theta,
          grad_fc1, grad_ln_w, grad_ln_b, grad_fc2};
}

}  // namespace CENET_NS
