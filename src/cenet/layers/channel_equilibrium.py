"""The Channel Equilibrium (CE) block (Shao et al., ICML 2020, Eqns 2-8, 32)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cenet import kernels
from cenet.layers._validate import check_input
from cenet.layers.batch_decorrelation import BatchDecorrelation
from cenet.layers.ce_operator import (
    CompiledCEOperator,
    compiled_operator_usable,
    compiled_step,
)
from cenet.layers.fused_block import fused_group_block, parameter_slots
from cenet.layers.grouped import apply_group_transform
from cenet.layers.instance_reweighting import InstanceReweighting
from cenet.layers.moments import (
    Moments,
    instance_variance,
    is_channels_last,
    spatial_variance,
)

CE_MODES = ("ce", "bd", "ir")


class ChannelEquilibrium(nn.Module):
    """CE block p = λ·BD(x̃) + (1 − λ)·IR(x̃), placed between a norm layer and the rectifier.

    The relaxed decorrelation operator of Eqn 4: BD (:class:`BatchDecorrelation`, Eqns 5-6) and
    IR (:class:`InstanceReweighting`, Eqns 7-8) mixed by λ = sigmoid(θ), θ a learnable scalar
    starting at 0 (λ = 0.5). Modes (paper Table 4): ``"ce"`` (λ learnable), ``"bd"`` (λ ≡ 1,
    no IR branch), ``"ir"`` (λ ≡ 0, no BD branch).

    Both branches are linear maps of x̃ per sample, so in ``"ce"`` mode the block applies one
    block-diagonal matrix per sample, A_n = λ·W + (1 − λ)·Diag(d_n) (W the group-wise BD
    matrix, d_n the IR weights), in a single batched product; the statistics of both branches
    come from one pass of per-sample moments (:func:`cenet.layers.moments.group_moments`).
    In training on an NCHW CPU tensor (without ``identity_init``), moments, operator
    and product are one autograd node with a one-pass input gradient
    (:mod:`cenet.layers.fused_block`), the operator computed by a compiled op with a
    hand-written backward (:mod:`cenet.layers.ce_operator`). In eval, W is the running
    matrix, i.e. the grouped 1×1 convolution of :meth:`BatchDecorrelation.conv_weight` plus
    the IR diagonal; under
    ``torch.no_grad`` on CPU the whole eval block (variances, gate, product) is one compiled
    kernel per sample (:func:`cenet.kernels.ce_eval`). The compiled training step and the eval
    kernel take a channels-last input by copying it to NCHW and the result back.

    Args:
        num_features: C, channels of the (N, C, H, W) input.
        mode: ``"ce"``, ``"bd"`` or ``"ir"``.
        group_size: g of BD (paper: 16); must divide C.
        num_iters: T, Newton iterations of BD (paper: 3).
        eps: ε of both branches.
        momentum: m of the running estimates (Eqn 32).
        pool: BD statistics on 2×2 max pooling (paper appendix G, after the stem).
        rd_ratio: 1/r of the IR gate (paper: r = 4).
        identity_init: beyond the paper: add a learnable gate g, initialized to 0, and
            return (1 − g)·x + g·CE(x), so a newly inserted block is an exact identity and a
            pretrained network keeps its outputs until fine-tuning moves g (folded into the
            same linear map: no extra pass over the feature map).

    Shape:
        input (N, C, H, W), output (N, C, H, W).

    Raises:
        ValueError: in ``__init__`` for an unknown mode or invalid branch arguments; in
            ``forward`` for a non-4D input, a wrong channel count or too few positions.
        FloatingPointError: in training for a batch whose statistics are not finite, raised
            before any running buffer is updated.
    """

    def __init__(
        self,
        num_features: int,
        *,
        mode: str = "ce",
        group_size: int = 16,
        num_iters: int = 3,
        eps: float = 1e-5,
        momentum: float = 0.1,
        pool: bool = False,
        rd_ratio: float = 1 / 4,
        identity_init: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if mode not in CE_MODES:
            raise ValueError(f"unknown CE mode {mode!r}; valid modes are {CE_MODES}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.mode = mode
        self.bd = self.ir = None
        if mode in ("ce", "bd"):
            self.bd = BatchDecorrelation(
                num_features, group_size=group_size, num_iters=num_iters, eps=eps,
                momentum=momentum, pool=pool, **factory,
            )
        if mode in ("ce", "ir"):
            self.ir = InstanceReweighting(
                num_features, rd_ratio=rd_ratio, eps=eps, momentum=momentum, **factory
            )
        if mode == "ce":
            self.theta = nn.Parameter(torch.zeros(1, **factory))
        self.identity_init = identity_init
        if identity_init:
            self.gate = nn.Parameter(torch.zeros(1, **factory))

    def extra_repr(self) -> str:
        extra = ", identity_init=True" if self.identity_init else ""
        return f"{self.num_features}, mode={self.mode!r}{extra}"

    @property
    def lam(self) -> Tensor:
        """λ = sigmoid(θ) as a (1,) tensor (1 in ``"bd"`` mode, 0 in ``"ir"`` mode)."""
        if self.mode == "ce":
            return torch.sigmoid(self.theta)
        return torch.full((1,), float(self.mode == "bd"))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and not torch.is_grad_enabled():
            check_input(x, self.num_features, type(self).__name__)
            out = self._fused_eval(x)
            if out is not None:
                return out
        if self.training and self.mode == "ce" and not self.identity_init:
            compiled = self.bd.fuse_training and compiled_operator_usable(self, x)
            if compiled and not self.bd.pool:
                check_input(x, self.num_features, type(self).__name__)
                self.bd.check_positions(x)
                return compiled_step(self, x)  # NCHW or channels-last
            if self.bd.fusable(x):
                check_input(x, self.num_features, type(self).__name__)
                self.bd.check_positions(x)
                operator = CompiledCEOperator(self) if compiled else self._batch_operator
                return fused_group_block(x, self.bd.group_size, operator,
                                         parameter_slots(self), pool=self.bd.pool)
        if not self.identity_init:
            if self.mode == "bd":
                return self.bd(x)
            if self.mode == "ir":
                return self.ir(x)
        check_input(x, self.num_features, type(self).__name__)
        wm, diag = self._operator(x)
        if self.identity_init:
            # y = (1 − g)·x + g·CE(x): folded into the operator, W' = gW + (1 − g)I, d' = g·d.
            g = self.gate
            diag = None if diag is None else g * diag
            if wm is None:
                diag = diag + (1 - g)
            else:
                eye = torch.eye(wm.shape[-1], dtype=wm.dtype, device=wm.device)
                wm = g * wm + (1 - g) * eye
        if wm is None:
            return x * diag.to(x.dtype)[:, :, None, None]
        return apply_group_transform(x, wm, diag)

    def _eval_kernel_usable(self, x: Tensor) -> bool:
        """True if :func:`cenet.kernels.ce_eval` takes this block on ``x`` (of any layout):
        an IR branch, no ``identity_init``, CPU tensors of one float32/float64 dtype."""
        ir = self.ir
        if ir is None or self.identity_init:
            return False
        group_size = 1 if self.bd is None else self.bd.group_size
        return kernels.kernels_usable(group_size, x, ir.fc1.weight, ir.norm.weight, ir.norm.bias,
                                      ir.fc2.weight)

    def _fused_eval(self, x: Tensor) -> Tensor | None:
        """Inference in one pass of the compiled kernel (:func:`cenet.kernels.ce_eval`): the
        same numbers as the general path, or ``None`` where the kernel does not apply (no IR
        branch, ``identity_init``, non-CPU input, other dtypes). A channels-last input is
        copied to NCHW for the kernel and the output back (1.1-13x faster than the
        channels-last graph at CIFAR VGG's maps)."""
        channels_last = is_channels_last(x)
        if not (x.is_contiguous() or channels_last) or not self._eval_kernel_usable(x):
            return None
        ir = self.ir
        group_size = 1 if self.bd is None else self.bd.group_size
        wm, scale, fc1t, fc2t = self._eval_constants(x.dtype)
        out = kernels.ce_eval(
            x.contiguous(), wm, fc1t, ir.norm.weight, ir.norm.bias, ir.norm.eps, fc2t, scale,
            group_size,
        )
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out

    def _eval_constants(self, dtype: torch.dtype) -> tuple[Tensor | None, float, Tensor, Tensor]:
        """λ·W_run (G, g, g) or None, (1 − λ)·ŝ^{-1/2} and the two gate layers transposed,
        (C, C/r) and (C/r, C), for the eval kernel, kept until a parameter or running buffer
        they come from changes (tensor identity, storage and version counter: in-place updates
        such as an optimizer step or ``load_state_dict`` count)."""
        ir = self.ir
        sources = [ir.running_inv_std, ir.fc1.weight, ir.fc2.weight]
        if self.bd is not None:
            sources += [self.theta, self.bd.running_wm]
        # (a module built under inference_mode has inference tensors: no version counter, so
        # nothing is kept)
        key = None
        if not any(t.is_inference() for t in sources):
            key = (dtype, *((id(t), t.data_ptr(), t._version) for t in sources))
        cached = self.__dict__.get("_eval_cache")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            wm, scale = None, ir.running_inv_std
            if self.bd is not None:
                lam = torch.sigmoid(self.theta)
                wm, scale = (lam * self.bd.running_wm).to(dtype), (1 - lam) * scale
            value = (wm, float(scale), ir.fc1.weight.t().contiguous().to(dtype),
                     ir.fc2.weight.t().contiguous().to(dtype))
        self.__dict__["_eval_cache"] = (key, value)
        return value

    def _operator(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The block's linear map: shared group matrices (G, g, g) and per-sample diagonals
        (N, C), A_n = λ·W + (1 − λ)·Diag(d_n); ``None`` for a branch that is not built.
        In training this updates the running statistics."""
        moments = None
        if self.bd is None:
            wm = None
        elif self.training:
            moments = self.bd.statistics(x)
            wm = self.bd.whitening_matrix(moments)
        else:
            wm = self.bd.running_wm
        diag = None
        if self.ir is not None:
            use_moments = moments is not None and not self.bd.pool
            inst_var = instance_variance(moments) if use_moments else spatial_variance(x)
            diag = self.ir.channel_scale(inst_var)
        return self._mixed(wm, diag) if self.mode == "ce" else (wm, diag)

    def _mixed(self, wm: Tensor, diag: Tensor) -> tuple[Tensor, Tensor]:
        """λ·W and (1 − λ)·d (Eqn 4), λ = sigmoid(θ)."""
        lam = torch.sigmoid(self.theta)
        return lam * wm, (1 - lam) * diag

    def _batch_operator(self, moments: Moments, ir_moments: Moments) -> tuple[Tensor, Tensor]:
        """The training operator of ``"ce"`` mode: λ·W from the BD moments (of the pooled
        input with ``pool``) and (1 − λ)·d from the per-sample moments of the input; updates
        the running statistics (:class:`cenet.layers.ce_operator.CompiledCEOperator` computes
        the same numbers with a hand-written backward)."""
        wm = self.bd.whitening_matrix(moments)
        return self._mixed(wm, self.ir.channel_scale(instance_variance(ir_moments)))
