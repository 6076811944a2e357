// The CE block's small graph in training (CE paper, Eqns 4-8, 21) and its hand-derived
// backward, as two ops of whole-tensor ATen calls: the Python graph of the same computation
// is about 50 small autograd nodes, whose dispatch costs more than their arithmetic at
// C = 256 (1.2 ms against 0.2 ms per step).
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
// All tensors of one dtype (float32 or float64); no autograd (cenet.layers.ce_operator wraps
// the pair in an autograd Function).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace {

using at::Tensor;

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
  // BD (Eqns 5, 6)
  const Tensor mu = mean_bd.mean(0).view({groups, g, 1});
  Tensor cov = at::baddbmm(second, mu, mu.transpose(1, 2), /*beta=*/1, /*alpha=*/-1);
  cov.diagonal(0, 1, 2).add_(eps_bd);
  const Tensor trace = cov.diagonal(0, 1, 2).sum(-1);
  const Tensor sn = cov / trace.view({groups, 1, 1});
  const Tensor eye = at::eye(g, sn.options());
  std::vector<Tensor> ps;  // P_1 .. P_T
  ps.push_back(at::add(eye * 1.5, sn, -0.5));
  for (int64_t k = 1; k < num_iters; ++k) {
    const Tensor& p = ps.back();
    const Tensor p3 = at::bmm(at::bmm(p, p), p);
    ps.push_back(at::baddbmm(p, p3, sn, /*beta=*/1.5, /*alpha=*/-0.5));
  }
  const Tensor& wm = ps.back();
  // IR (Eqns 7, 8, 21)
  const Tensor raw = sq_ir - mean_ir * mean_ir;
  const Tensor var = raw.clamp_min(0);
  const Tensor inv_std = (var.mean() + eps_ir).rsqrt().reshape({1});
  const Tensor h1 = at::mm(var, fc1.t());
  const Tensor rstd = (h1.var(-1, /*unbiased=*/false, /*keepdim=*/true) + ln_eps).rsqrt();
  const Tensor xhat = (h1 - h1.mean(-1, true)) * rstd;
  const Tensor r = at::addcmul(ln_b, xhat, ln_w).clamp_min_(0);
  const Tensor gate = at::mm(r, fc2.t()).sigmoid_();
  const Tensor d = gate * inv_std;
  const Tensor lam = theta.sigmoid();
  const Tensor finite = at::logical_and(cov.isfinite().all(), inv_std.isfinite().all());
  std::vector<Tensor> out{wm * lam, d * (1 - lam), wm, inv_std, finite,
                          // saved for backward
                          sn, trace, mu, raw, var, xhat, rstd, r, gate, lam};
  for (int64_t k = 0; k + 1 < num_iters; ++k) out.push_back(ps[k]);
  return out;
}

std::vector<Tensor> ce_operator_backward(const Tensor& grad_wm, const Tensor& grad_d,
                                         const Tensor& mean_ir, const Tensor& fc1,
                                         const Tensor& ln_w, const Tensor& fc2,
                                         const std::vector<Tensor>& forward_out) {
  TORCH_CHECK(forward_out.size() >= 15, "ce_operator_backward: expected ce_operator's outputs");
  const Tensor &wm = forward_out[2], &inv_std = forward_out[3], &sn = forward_out[5],
               &trace = forward_out[6], &mu = forward_out[7], &raw = forward_out[8],
               &var = forward_out[9], &xhat = forward_out[10], &rstd = forward_out[11],
               &r = forward_out[12], &gate = forward_out[13], &lam = forward_out[14];
  const int64_t num_iters = int64_t(forward_out.size()) - 14;
  const int64_t n = var.size(0), c = var.size(1);
  const int64_t groups = sn.size(0), g = sn.size(1);
  // λ mixing (Eqn 4)
  const Tensor d = gate * inv_std;
  const Tensor grad_lam = (grad_wm * wm).sum() - (grad_d * d).sum();
  const Tensor grad_theta = (grad_lam * lam * (1 - lam)).reshape({1});
  // IR
  const Tensor grad_draw = grad_d * (1 - lam);
  const Tensor grad_inv = (grad_draw * gate).sum();
  const Tensor grad_z = grad_draw * inv_std * gate * (1 - gate);
  const Tensor grad_fc2 = at::mm(grad_z.t(), r);
  const Tensor grad_ln = at::mm(grad_z, fc2).mul_(r > 0);
  const Tensor grad_ln_w = (grad_ln * xhat).sum(0);
  const Tensor grad_ln_b = grad_ln.sum(0);
  const Tensor grad_xhat = grad_ln * ln_w;
  const Tensor grad_h1 = rstd * (grad_xhat - grad_xhat.mean(-1, true) -
                                 xhat * (grad_xhat * xhat).mean(-1, true));
  const Tensor grad_fc1 = at::mm(grad_h1.t(), var);
  // s = mean σ²: d inv_std / ds = -inv_std³ / 2
  Tensor grad_var = at::mm(grad_h1, fc1).add_(grad_inv * inv_std.pow(3) * (-0.5 / (n * c)));
  grad_var.mul_(raw >= 0);
  const Tensor grad_mean_ir = -2 * mean_ir * grad_var;
  // BD: back through the Newton steps
  Tensor grad_p = grad_wm * lam;
  Tensor grad_sn = at::zeros_like(sn);
  for (int64_t k = num_iters - 1; k >= 1; --k) {
    const Tensor& p = forward_out[15 + k - 1];
    const Tensor p2 = at::bmm(p, p);
    const Tensor p3 = at::bmm(p2, p);
    // P_{k+1} = 1.5 P - 0.5 P³ Σ_N
    const Tensor grad_p3 = at::bmm(grad_p, sn.transpose(1, 2)) * -0.5;
    grad_sn.baddbmm_(p3.transpose(1, 2), grad_p, /*beta=*/1, /*alpha=*/-0.5);
    const Tensor pt = p.transpose(1, 2), p2t = p2.transpose(1, 2);
    Tensor next = at::bmm(grad_p3, p2t);
    next.baddbmm_(at::bmm(pt, grad_p3), pt);
    next.baddbmm_(p2t, grad_p3);
    grad_p = next.add_(grad_p, 1.5);
  }
  grad_sn.add_(grad_p, -0.5);  // P_1 = 1.5 I - 0.5 Σ_N
  // Σ_N = Σ / tr Σ
  Tensor grad_cov = grad_sn / trace.view({groups, 1, 1});
  grad_cov.diagonal(0, 1, 2).sub_(((grad_sn * sn).sum({1, 2}) / trace).view({groups, 1}));
  // Σ = second - μμᵀ + εI, μ = mean over the batch of mean_bd
  const Tensor grad_mu = at::bmm(grad_cov + grad_cov.transpose(1, 2), mu).neg_();
  const Tensor grad_mean_bd = (grad_mu.view({1, c}) / n).expand({n, c}).contiguous();
  return {grad_mean_bd, grad_cov, grad_mean_ir, grad_var, grad_theta,
          grad_fc1, grad_ln_w, grad_ln_b, grad_fc2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cenet_kernels, lib) {
  lib.def(
      "ce_operator(Tensor mean_bd, Tensor second, Tensor mean_ir, Tensor sq_ir, Tensor theta,"
      " Tensor fc1, Tensor ln_w, Tensor ln_b, Tensor fc2, float eps_bd, float eps_ir,"
      " float ln_eps, int num_iters) -> Tensor[]");
  lib.def(
      "ce_operator_backward(Tensor grad_wm, Tensor grad_d, Tensor mean_ir, Tensor fc1,"
      " Tensor ln_w, Tensor fc2, Tensor[] forward_out) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(cenet_kernels, CPU, lib) {
  lib.impl("ce_operator", &ce_operator);
  lib.impl("ce_operator_backward", &ce_operator_backward);
}
