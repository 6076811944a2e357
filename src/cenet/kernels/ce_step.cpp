// The CE block's training step on an NCHW map (without pooling) as two ops, forward and
// backward, that chain the kernels of block_ops.cpp and the operator of ce_operator.cpp (direct
// C++ calls): between the passes over the map only a few small tensors change hands, and from
// Python they cost more than they compute (the block alone, forward and backward, 2.49 ->
// 2.13 ms at (64, 256, 8, 8)).
//
// X (N,C,H,W) NCHW-contiguous, seen by the kernels as B = N*G blocks of g feature rows, M = H*W.
//   ce_step(X, g, theta, fc1, ln_w, ln_b, fc2, eps_bd, eps_ir, ln_eps, T) -> [Y (N,C,H,W),
//       mean (N,C), then ce_operator's outputs]: the moments (one pass), the operator, and
//       Y_b = (λW + (1-λ) Diag(d_b)) X_b (one pass)
//   ce_step_backward(dY, X, fc1, ln_w, fc2, saved = ce_step's outputs but Y)
//       -> [dX, dθ, dfc1, dln_w, dln_b, dfc2]:
//       Σ_n dY_b X_bᵀ and its diagonals (one pass), the operator's backward, then
//       dX_b = A_bᵀ dY_b + (S + Diag(2 dsq_b / M)) X_b + dmean_b / M (one pass),
//       S = (dΣ + dΣᵀ) / (N M)
//
// This file registers the public ops of one build, torch.ops.<CENET_NS>.*:
//   ce_step, ce_step_backward (above), ce_eval, ce_eval_nhwc and stream_threshold
//   (block_ops.cpp).

#include "cenet_kernels.h"

#include <torch/library.h>

#include <tuple>
#include <vector>

namespace CENET_NS {
namespace {

using at::Tensor;

// (N,C,H,W) as (N*G, g, H*W)
Tensor blocks(const Tensor& x, int64_t g) {
  return x.view({x.size(0) * (x.size(1) / g), g, x.size(2) * x.size(3)});
}

std::vector<Tensor> ce_step(const Tensor& x4, int64_t g, const Tensor& theta, const Tensor& fc1,
                            const Tensor& ln_w, const Tensor& ln_b, const Tensor& fc2,
                            double eps_bd, double eps_ir, double ln_eps, int64_t num_iters) {
  TORCH_CHECK(x4.dim() == 4 && x4.is_contiguous() && g > 0 && x4.size(1) % g == 0,
              "ce_step: expected NCHW-contiguous X (N,C,H,W) with g dividing C, got ",
              x4.sizes(), " and g = ", g);
  const Tensor x = blocks(x4, g);
  const int64_t n = x4.size(0), b = x.size(0), m = x.size(2), groups = b / n;
  auto [second, sq, total] = group_gram(x, x, groups, true, true, true);
  const Tensor mean = total.view({n, groups * g}).div_(m);
  const Tensor sq_mean = sq.view({n, groups * g}).div_(m);
  second.div_(n * m);
  std::vector<Tensor> out = ce_operator(mean, second, mean, sq_mean, theta, fc1, ln_w, ln_b, fc2,
                                        eps_bd, eps_ir, ln_eps, num_iters);
  const Tensor y = at::empty_like(x4);  // allocated in its shape (an in-place op may follow)
  Tensor yb = blocks(y, g);
  group_apply(out[0], x, out[1].view({b, g}), at::empty({0}, x.options()), false, yb);
  out.insert(out.begin(), {y, mean});
  return out;
}

std::vector<Tensor> ce_step_backward(const Tensor& grad, const Tensor& x4, const Tensor& fc1,
                                     const Tensor& ln_w, const Tensor& fc2,
                                     const std::vector<Tensor>& saved) {
  TORCH_CHECK(saved.size() >= 2 && x4.dim() == 4 && grad.sizes() == x4.sizes(),
              "ce_step_backward: expected dY and X (N,C,H,W) and ce_step's outputs but Y");
  const Tensor& mean = saved[0];
  const int64_t g = saved[1].size(1);  // from λW (G,g,g)
  const Tensor x = blocks(x4, g);
  const int64_t b = x.size(0), m = x.size(2);
  const int64_t n = mean.size(0), groups = b / n;
  const Tensor dy = blocks(grad.contiguous(), g);
  auto [grad_wm, grad_diag, unused] = group_gram(dy, x, groups, true, false, false);
  const std::vector<Tensor> op_out(saved.begin() + 1, saved.end());
  const std::vector<Tensor> grads =
      ce_operator_backward(grad_wm, grad_diag.view({n, groups * g}), mean, fc1, ln_w, fc2, op_out);
  // grads: mean (BD), second, mean (IR), sq (IR), theta, fc1, ln_w, ln_b, fc2
  const Tensor sym = (grads[1] + grads[1].transpose(1, 2)).div_(n * m);
  const Tensor d2 = grads[3].view({b, g}).mul(2.0 / m);
  const Tensor bias = (grads[0] + grads[2]).view({b, g}).div_(m);
  const Tensor grad_x = at::empty_like(x4);
  Tensor grad_xb = blocks(grad_x, g);
  group_apply_pair(op_out[0], dy, op_out[1].view({b, g}), sym, x, d2, bias, grad_xb);
  return {grad_x, grads[4], grads[5], grads[6], grads[7], grads[8]};
}

}  // namespace
}  // namespace CENET_NS

// TORCH_LIBRARY stringizes its namespace argument: one more macro level expands CENET_NS first.
#define CENET_TORCH_LIBRARY(ns, lib) TORCH_LIBRARY(ns, lib)
#define CENET_TORCH_LIBRARY_IMPL(ns, key, lib) TORCH_LIBRARY_IMPL(ns, key, lib)

CENET_TORCH_LIBRARY(CENET_NS, lib) {
  lib.def(
      "ce_step(Tensor x, int group_size, Tensor theta, Tensor fc1, Tensor ln_w, Tensor ln_b,"
      " Tensor fc2,"
      " float eps_bd, float eps_ir, float ln_eps, int num_iters) -> Tensor[]");
  lib.def(
      "ce_step_backward(Tensor grad, Tensor x, Tensor fc1, Tensor ln_w, Tensor fc2,"
      " Tensor[] saved) -> Tensor[]");
  lib.def(
      "ce_eval(Tensor x, Tensor w, Tensor fc1, Tensor ln_w, Tensor ln_b, float ln_eps, Tensor fc2,"
      " Tensor scale, int group_size, Tensor(a!) out) -> ()");
  lib.def(
      "ce_eval_nhwc(Tensor x, Tensor w, Tensor fc1, Tensor ln_w, Tensor ln_b, float ln_eps,"
      " Tensor fc2, Tensor scale, int group_size, Tensor(a!) out) -> ()");
  lib.def("stream_threshold(int bytes) -> int", &CENET_NS::stream_threshold);
}

CENET_TORCH_LIBRARY_IMPL(CENET_NS, CPU, lib) {
  lib.impl("ce_step", &CENET_NS::ce_step);
  lib.impl("ce_step_backward", &CENET_NS::ce_step_backward);
  lib.impl("ce_eval", &CENET_NS::ce_eval);
  lib.impl("ce_eval_nhwc", &CENET_NS::ce_eval_nhwc);
}
