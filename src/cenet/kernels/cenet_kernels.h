// Shared declarations of the CE block's CPU kernels (block_ops.cpp, ce_operator.cpp,
// ce_step.cpp) and the per-architecture settings they compile with.
//
// One build per instruction set: cenet.kernels compiles these sources with a fixed -march
// (x86-64, x86-64-v3, x86-64-v4; armv8-a) and -DCENET_NS=cenet_kernels_<isa>, the C++ namespace
// of everything below and the torch.ops namespace of the registered ops, so that the builds of
// several instruction sets load side by side in one process without sharing a symbol.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#ifndef CENET_NS
#define CENET_NS cenet_kernels
#endif

// Bytes of the widest vector register the target instruction set has: the GCC vector extension
// types of the kernels are this wide (AVX-512: 64; AVX, AVX2: 32; SSE2 on plain x86-64, NEON on
// aarch64 and anything else: 16).
#if defined(__AVX512F__)
#define CENET_VEC_BYTES 64
#elif defined(__AVX__)
#define CENET_VEC_BYTES 32
#else
#define CENET_VEC_BYTES 16
#endif

// CENET_OPAQUE(x): x (a scalar or one vector, in a register) becomes a value the optimizer
// cannot see through, so that it is rounded on its own: a multiply whose result passes through
// it is not fused with a later add (FMA contraction, which GCC does in C++ wherever the target
// has FMA). A no-op where no register constraint is known (the contraction may then happen).
#if defined(__x86_64__) || defined(__i386__)
#define CENET_OPAQUE(x) asm("" : "+v"(x))
#elif defined(__aarch64__)
#define CENET_OPAQUE(x) asm("" : "+w"(x))
#else
#define CENET_OPAQUE(x) ((void)0)
#endif

namespace CENET_NS {

// The products of small channel-group matrices with feature rows (block_ops.cpp). X (B,g,M)
// holds B = N*G blocks of g feature rows, batch b being group b mod G of sample b / G.

// out_b = (W_{b mod G}[^T] + Diag(diag_b)) X_b + bias_b; diag, bias (B,g) or empty.
void group_apply(const at::Tensor& w, const at::Tensor& x, const at::Tensor& diag,
                 const at::Tensor& bias, bool transpose, at::Tensor& out);

// out_b = (W1^T + Diag(d1_b)) X1_b + (W2 + Diag(d2_b)) X2_b + bias_b (W2 empty: no W2 term).
void group_apply_pair(const at::Tensor& w1, const at::Tensor& x1, const at::Tensor& d1,
                      const at::Tensor& w2, const at::Tensor& x2, const at::Tensor& d2,
                      const at::Tensor& bias, at::Tensor& out);

// (sum_{b mod G = j} X_b Y_b^T (G,g,g), diagonals (B,g) or empty, row sums (B,g) or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_gram(const at::Tensor& x,
                                                          const at::Tensor& y, int64_t groups,
                                                          bool with_diag, bool symmetric,
                                                          bool with_sums);

// The eval-mode CE block: out_n = (W + Diag(d_n)) X_n, X (N,C,M); fc1 (Hd,C), fc2 (C,Hd) as
// nn.Linear stores them; scale a one-element tensor.
void ce_eval(const at::Tensor& x, const at::Tensor& w, const at::Tensor& fc1,
             const at::Tensor& ln_w, const at::Tensor& ln_b, double ln_eps,
             const at::Tensor& fc2, const at::Tensor& scale, int64_t group_size,
             at::Tensor& out);

// The same on a channels-last map: X and out (N,M,C) contiguous, M = H*W.
void ce_eval_nhwc(const at::Tensor& x, const at::Tensor& w, const at::Tensor& fc1,
                  const at::Tensor& ln_w, const at::Tensor& ln_b, double ln_eps,
                  const at::Tensor& fc2, const at::Tensor& scale, int64_t group_size,
                  at::Tensor& out);

// out (S,R) = A (S,K) W^T, W (R,K) row-major (nn.Linear's layout, F.linear without bias):
// out[s][r] = A_s . W_r, dot products in register tiles of W's rows x samples, split over W's
// rows across threads outside a parallel region (block_ops.cpp; float and double).
template <typename T>
void linear_rows(const T* a, int64_t samples, int64_t k_dim, const T* w, int64_t r_dim, T* out);

// d[i] = scale * sigmoid(d[i]), i < n (float lanes through a vector exp, within 2 ulp).
template <typename T>
void scaled_sigmoid(T* d, int64_t n, T scale);

// The IR gates of S samples (CE paper, Eqns 8, 21), from their channel variances var (S,C):
//   hid_s = ReLU(LN(fc1 var_s)) (S,Hd),  d_s = scale * sigmoid(fc2 hid_s) (S,C),
// fc1 (Hd,C), fc2 (C,Hd), LayerNorm over the Hd hidden features with weights ln_w, ln_b (Hd).
// Eval (ce_eval) and training (ce_operator, scale 1) both compute it here; training also
// keeps what its backward needs: xhat (S,Hd) the normalized features before the affine map,
// rstd (S) the LayerNorm's 1/sqrt(variance + eps) (either null: not kept).
template <typename T>
inline void ir_gate(const T* var, int64_t samples, int64_t c_dim, const T* fc1, const T* ln_w,
                    const T* ln_b, T ln_eps, const T* fc2, int64_t hd, T scale, T* hid, T* d,
                    T* xhat = nullptr, T* rstd = nullptr) {
  linear_rows<T>(var, samples, c_dim, fc1, hd, hid);
  for (int64_t s = 0; s < samples; ++s) {
    T* h = hid + s * hd;
    T mu = 0, v = 0;
    for (int64_t j = 0; j < hd; ++j) mu += h[j];
    mu /= hd;
    for (int64_t j = 0; j < hd; ++j) v += (h[j] - mu) * (h[j] - mu);
    const T rs = T(1) / std::sqrt(v / hd + ln_eps);
    if (rstd) rstd[s] = rs;
    for (int64_t j = 0; j < hd; ++j) {
      const T xh = (h[j] - mu) * rs;
      if (xhat) xhat[s * hd + j] = xh;
      h[j] = std::max(xh * ln_w[j] + ln_b[j], T(0));
    }
  }
  linear_rows<T>(hid, samples, hd, fc2, c_dim, d);
  scaled_sigmoid<T>(d, samples * c_dim, scale);
}

// The output size in bytes from which products are written with non-temporal stores;
// bytes >= 0 sets it, bytes < 0 leaves it. Returns the previous value.
int64_t stream_threshold(int64_t bytes);

// The CE block's small graph in training and its backward (ce_operator.cpp).
std::vector<at::Tensor> ce_operator(const at::Tensor& mean_bd, const at::Tensor& second,
                                    const at::Tensor& mean_ir, const at::Tensor& sq_ir,
                                    const at::Tensor& theta, const at::Tensor& fc1,
                                    const at::Tensor& ln_w, const at::Tensor& ln_b,
                                    const at::Tensor& fc2, double eps_bd, double eps_ir,
                                    double ln_eps, int64_t num_iters);

std::vector<at::Tensor> ce_operator_backward(const at::Tensor& grad_wm, const at::Tensor& grad_d,
                                             const at::Tensor& mean_ir, const at::Tensor& fc1,
                                             const at::Tensor& ln_w, const at::Tensor& fc2,
                                             const std::vector<at::Tensor>& forward_out);

}  // namespace CENET_NS
