"""Whitening normalization layers, baselines used in place of BN (CE paper, Table 3).

- :class:`IterNorm` (Huang et al., "Iterative Normalization: Beyond Standardization towards
  Efficient Whitening", CVPR 2019): Newton iterations on the trace-normalized covariance,
  with the trace rescaled back.
- :class:`DecorrelatedBatchNorm` (Huang et al., "Decorrelated Batch Normalization", CVPR 2018):
  ZCA whitening by eigendecomposition.

Both whiten groups of consecutive channels with the batch statistics in training and with
running estimates in eval, then apply a per-channel affine ``weight``/``bias`` like
``nn.BatchNorm2d``, so either can be passed as a network's ``norm_layer``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cenet.layers._validate import (
    check_eps,
    check_group_size,
    check_input,
    check_positive_int,
    check_unit_interval,
)
from cenet.layers.functional import (
    batch_covariance,
    channel_equilibrium,
    group_statistics,
    newton_schulz_isqrt,
    no_autocast,
    trace_normalize,
)


class _GroupWhiteningNorm(nn.Module):
    """Shared machinery: x̂ = W (x − μ) per channel group, then y = γ ⊙ x̂ + β.

    Subclasses implement :meth:`whitening` (the (G, g, g) matrix W from the batch covariance).
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int,
        eps: float,
        momentum: float,
        affine: bool,
        device,
        dtype,
    ) -> None:
        super().__init__()
        check_group_size(num_features, group_size)
        check_eps(eps)
        check_unit_interval("momentum", momentum, closed=False)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.group_size = group_size
        self.num_groups = num_features // group_size
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        buf_dtype = dtype or torch.float32
        self.register_buffer("running_mean", torch.zeros(num_features, device=device,
                                                         dtype=buf_dtype))
        eye = torch.eye(group_size, device=device, dtype=buf_dtype)
        self.register_buffer("running_wm", eye.repeat(self.num_groups, 1, 1).contiguous())

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, group_size={self.group_size}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}"
        )

    def reset_running_stats(self) -> None:
        """Reset ``running_mean`` to 0 and ``running_wm`` to the identity."""
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_wm.copy_(torch.eye(self.group_size, dtype=self.running_wm.dtype))

    def reset_parameters(self) -> None:
        """Reset the running statistics and the affine ``weight``/``bias`` to 1 and 0."""
        self.reset_running_stats()
        if self.affine:
            with torch.no_grad():
                self.weight.fill_(1.0)
                self.bias.zero_()

    def whitening(self, cov: Tensor) -> Tensor:
        """The whitening matrices W (G, g, g) of the covariances Σ + εI ``cov`` (G, g, g)."""
        raise NotImplementedError

    def _divergence_hint(self) -> str:
        return "overflow in the whitening"

    def batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Batch mean μ (C,) and whitening matrix W (G, g, g) of ``x``, and the running update.

        Raises:
            ValueError: if there are fewer than 2 positions (N·H·W) to estimate from.
            FloatingPointError: if the covariance or W is not finite; nothing is updated then.
        """
        n, _, h, w = x.shape
        name = type(self).__name__
        if n * h * w < 2:
            raise ValueError(
                f"{name} needs at least 2 positions per group in training to estimate a "
                f"covariance, got N·H·W = {n}·{h}·{w} = {n * h * w}; use a larger batch or "
                f"call .eval()"
            )
        stats = group_statistics(x, self.group_size)
        cov = batch_covariance(stats)
        cov = cov + self.eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        if not torch.isfinite(cov).all():
            raise FloatingPointError(
                f"{name}: the batch covariance is not finite (NaN/Inf in the input); the "
                f"running statistics were not updated"
            )
        mean = (stats.total / stats.count).reshape(self.num_features)
        wm = self.whitening(cov)
        if not torch.isfinite(wm).all():
            raise FloatingPointError(
                f"{name}: the whitening matrix is not finite ({self._divergence_hint()}); the "
                f"running statistics were not updated"
            )
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_wm.lerp_(wm.detach().to(self.running_wm.dtype), self.momentum)
        return mean, wm

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with no_autocast(x.device):
            if self.training:
                mean, wm = self.batch_statistics(x)
            else:
                mean, wm = self.running_mean, self.running_wm
            xc = x.to(dtype) - mean.to(dtype)[:, None, None]
            out = channel_equilibrium(xc, wm.to(dtype), None)
            if self.affine:
                out = torch.addcmul(self.bias.to(dtype)[:, None, None], out,
                                    self.weight.to(dtype)[:, None, None])
        return out.to(x.dtype)


class IterNorm(_GroupWhiteningNorm):
    """Iterative normalization x̂ = Σ^{-1/2} (x − μ) by Newton iterations (Huang et al. 2019,
    Algorithm 1, Eqns 6-8).

    In training, per group of ``group_size`` consecutive channels: the batch mean μ and
    covariance Σ = (1/M) Σ (x − μ)(x − μ)ᵀ + εI over the M = N·H·W positions; Σ_N = Σ / tr Σ;
    P_T from ``num_iters`` Newton steps P_k = ½(3P_{k−1} − P_{k−1}³ Σ_N), P_0 = I
    (:func:`cenet.layers.functional.newton_schulz_isqrt`); the whitening matrix
    W = P_T / (tr Σ)^{1/2} (the trace rescaled back); x̂ = W (x − μ). With finite T the
    whitening is partial: an eigenvalue λ of Σ_N becomes the eigenvalue λ·p_T(λ)² < 1 of the
    covariance of x̂, the closer to 1 the larger λ and T.

    Use a small T (the paper's 5; ≲ 10). The iteration is the paper's uncoupled one, whose
    converged fixed point is numerically unstable once the eigenvalue ratio of a group's Σ
    exceeds ≈ 2.4 (linearizing at P = Σ_N^{-1/2}, a round-off component between eigenvalues
    λ_i, λ_j is multiplied by |2 − r − r²| / 2 per step, r = (λ_j/λ_i)^{1/2}): after
    convergence round-off grows geometrically. Measured on a 64-channel group with
    cond(Σ) ≈ 270 the whitening is still partial and float32 matches float64 at T = 10, but
    the output covariance is off by ~70 at T = 12 in float32 (T = 20 in float64) and overflows
    a few steps later; a batch whose W is not finite raises ``FloatingPointError``.

    Then y = ``weight`` ⊙ x̂ + ``bias`` (initialized to 1 and 0). ``running_mean`` (C,)
    (starts at 0) and ``running_wm`` (G, g, g) (starts at I) follow
    r ← (1 − m) r + m·(batch value) with ``momentum`` m and replace μ and W in eval.

    Statistics, whitening and affine are computed in the input's dtype promoted to at least
    float32 with autocast disabled; the output has the input's dtype and memory layout (NCHW
    or channels-last, handled without copying by
    :func:`cenet.layers.functional.group_statistics`). Gradients flow through μ and W in training.

    Args:
        num_features: C, channels of the (N, C, H, W) input.
        group_size: g, channels per group (paper: 64); must divide C.
        num_iters: T, Newton iterations (paper: 5).
        eps: ε added to the covariance diagonal.
        momentum: m of the running estimates, in (0, 1].
        affine: learn the per-channel ``weight`` and ``bias`` (C,).
        device, dtype: factory arguments of the parameters and buffers (buffers default to
            float32).

    Shape:
        input (N, C, H, W), output (N, C, H, W).

    Raises:
        ValueError: in ``__init__`` for a group size that does not divide C, a non-positive
            ``num_iters`` or ``eps``, or ``momentum`` outside (0, 1]; in ``forward`` for a
            non-4D input, a wrong channel count, or fewer than 2 positions in training.
        FloatingPointError: in training for a batch whose covariance or whitening matrix is
            not finite (the latter when the Newton iteration diverges), raised before any
            running buffer is updated.
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int = 64,
        num_iters: int = 5,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, group_size=group_size, eps=eps, momentum=momentum,
                         affine=affine, device=device, dtype=dtype)
        check_positive_int("num_iters", num_iters)
        self.num_iters = num_iters

    def extra_repr(self) -> str:
        return super().extra_repr().replace(", eps=", f", num_iters={self.num_iters}, eps=", 1)

    def _divergence_hint(self) -> str:
        return f"the Newton iteration diverged with num_iters={self.num_iters}; use fewer"

    def whitening(self, cov: Tensor) -> Tensor:
        """W = Newton_T(Σ / tr Σ) / (tr Σ)^{1/2}, (G, g, g) (IterNorm, Algorithm 1)."""
        trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        p = newton_schulz_isqrt(trace_normalize(cov), self.num_iters)
        return p * trace.to(p.dtype).rsqrt()[:, None, None]


class DecorrelatedBatchNorm(_GroupWhiteningNorm):
    """Decorrelated batch normalization (DBN): ZCA whitening x̂ = Σ^{-1/2} (x − μ)
    (Huang et al. 2018, Eqns 4-6 and Algorithm 1).

    In training, per group of ``group_size`` consecutive channels: the batch mean μ and
    covariance Σ over the M = N·H·W positions, its eigendecomposition Σ = U diag(λ) Uᵀ
    (``torch.linalg.eigh``, always in float64), the ZCA matrix W = U diag((λ + ε)^{-1/2}) Uᵀ
    (λ clamped at 0 against round-off first) and x̂ = W (x − μ). Then y = ``weight`` ⊙ x̂ +
    ``bias`` (initialized to 1 and 0). ``running_mean`` (C,) (starts at 0) and ``running_wm``
    (G, g, g) (starts at I) follow r ← (1 − m) r + m·(batch value) and replace μ and W in
    eval. Gradients flow through the eigendecomposition, whose backward is ill-conditioned
    when two eigenvalues of a group nearly coincide (a property of DBN, not of this code).

    Computed in the input's dtype promoted to at least float32 (the eigendecomposition in
    float64) with autocast disabled; the output has the input's dtype and memory layout
    (NCHW or channels-last).

    Args:
        num_features: C, channels of the (N, C, H, W) input.
        group_size: g, channels per group (paper: 16); must divide C.
        eps: ε added to the eigenvalues.
        momentum: m of the running estimates, in (0, 1].
        affine: learn the per-channel ``weight`` and ``bias`` (C,).
        device, dtype: factory arguments of the parameters and buffers (buffers default to
            float32).

    Shape:
        input (N, C, H, W), output (N, C, H, W).

    Raises:
        ValueError: in ``__init__`` for a group size that does not divide C, a non-positive
            ``eps``, or ``momentum`` outside (0, 1]; in ``forward`` for a non-4D input, a
            wrong channel count, or fewer than 2 positions in training.
        FloatingPointError: in training for a batch whose covariance or whitening matrix is
            not finite, raised before any running buffer is updated.
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int = 16,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, group_size=group_size, eps=eps, momentum=momentum,
                         affine=affine, device=device, dtype=dtype)

    def whitening(self, cov: Tensor) -> Tensor:
        """W = U diag((λ + ε)^{-1/2}) Uᵀ for Σ + εI = ``cov`` (G, g, g) (DBN, Eqn 6)."""
        # eigh(Σ + εI) has the eigenvalues λ + ε; clamping them at ε guards against round-off.
        evals, evecs = torch.linalg.eigh(cov.double())
        scale = evals.clamp_min(self.eps).rsqrt()
        return ((evecs * scale[:, None, :]) @ evecs.transpose(-2, -1)).to(cov.dtype)
