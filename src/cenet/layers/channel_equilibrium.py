"""The Channel Equilibrium (CE) block (Shao et al., ICML 2020, Eqns 2-8, 32)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cenet import kernels
from cenet.kernels import operators
from cenet.layers import functional as CF
from cenet.layers._running import check_finite
from cenet.layers._validate import check_input
from cenet.layers.batch_decorrelation import BatchDecorrelation
from cenet.layers.instance_reweighting import InstanceReweighting

CE_MODES = ("ce", "bd", "ir")
_NATIVE_DTYPES = (torch.float32, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@torch.compiler.assume_constant_result
def _kernels_active() -> bool:
    """The native kernels are loaded for some instruction set (a constant while tracing)."""
    return kernels.active_isa() is not None


class ChannelEquilibrium(nn.Module):
    """CE block p = λ·BD(x̃) + (1 − λ)·IR(x̃), placed between a norm layer and the rectifier.

    The relaxed decorrelation operator of Eqn 4: BD (:class:`BatchDecorrelation`, Eqns 5-6) and
    IR (:class:`InstanceReweighting`, Eqns 7-8) mixed by λ = sigmoid(θ), θ a learnable scalar
    starting at 0 (λ = 0.5). Modes (paper Table 4): ``"ce"`` (λ learnable), ``"bd"`` (λ ≡ 1,
    no IR branch), ``"ir"`` (λ ≡ 0, no BD branch). Both branches are linear maps of x̃ per
    sample, so the block applies one block-diagonal matrix per sample,
    A_n = λ·W + (1 − λ)·Diag(d_n) (:func:`cenet.layers.functional.channel_equilibrium`).

    Two implementations compute it: the reference (:mod:`cenet.layers.functional`, any device,
    ``torch.compile``, ``torch.export``) and, on the CPU, the native operators
    (:mod:`cenet.kernels.operators`); :meth:`uses_native` chooses. Running estimates are updated in
    one place, :meth:`_update_running`, from the statistics the forward used.

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
        input (N, C, H, W), output (N, C, H, W), same dtype and memory layout.

    Raises:
        ValueError: in ``__init__`` for an unknown mode or invalid branch arguments; in
            ``forward`` for a non-4D input, a wrong channel count or too few positions.
        TypeError: in ``forward`` for an input whose dtype does not match the module's
            (a float16/bfloat16 input into a float32 module is mixed precision and allowed).
        FloatingPointError: in eager CPU training for a batch whose statistics are not
            finite, raised before any running buffer is updated (elsewhere the buffers are
            kept unchanged for such a batch).
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
        ref = self._reference_tensor()
        return torch.full((1,), float(self.mode == "bd"), dtype=ref.dtype, device=ref.device)

    def _reference_tensor(self) -> Tensor:
        """A tensor whose dtype and device are the module's."""
        return self.bd.running_wm if self.bd is not None else self.ir.fc1.weight

    def _param_dtype(self) -> torch.dtype:
        return self._reference_tensor().dtype

    def uses_native(self, x: Tensor) -> bool:
        """The dispatch: True if the native CPU operator computes this block on ``x``.

        Native where the kernels are loaded (:func:`cenet.kernels.active_isa`), ``x`` is an
        NCHW or channels-last CPU tensor of the module's float32/float64 dtype, and the
        operator covers the configuration: in training ``"ce"`` mode without pooling (the
        stem's pooled CE, ``"bd"``/``"ir"`` modes and ``identity_init`` use the reference),
        in eval an IR branch under ``torch.no_grad`` (the op has no autograd formula).
        """
        if not (_kernels_active() and x.device.type == "cpu"
                and x.dtype in _NATIVE_DTYPES and x.dtype == self._param_dtype()
                and (x.is_contiguous() or CF.is_channels_last(x))
                and not self.identity_init and (self.bd is None or self.bd.group_size <= 64)):
            return False
        if self.training:
            return self.mode == "ce" and not self.bd.pool
        return self.ir is not None and not torch.is_grad_enabled()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.training and self.bd is not None:
            self.bd.check_positions(x)
        if self.uses_native(x):
            return self._native(x)
        return self._reference(x)

    def _check_input(self, x: Tensor) -> None:
        check_input(x, self.num_features, type(self).__name__)
        dtype = self._param_dtype()
        if x.dtype != dtype and not (x.dtype in _LOW_PRECISION and dtype == torch.float32):
            raise TypeError(
                f"{type(self).__name__}: input dtype {x.dtype} does not match the module's "
                f"dtype {dtype}; convert one of them (module.to({x.dtype}) or "
                f"x.to({dtype})), or run a float32 module under torch.autocast"
            )

    def _native(self, x: Tensor) -> Tensor:
        ir = self.ir
        if self.training:
            step = operators.ce_train(
                x, self.theta, ir.fc1.weight, ir.norm.weight, ir.norm.bias, ir.fc2.weight,
                group_size=self.bd.group_size, num_iters=self.bd.num_iters, eps_bd=self.bd.eps,
                eps_ir=ir.eps, ln_eps=ir.norm.eps,
            )
            self._update_running(step.wm, step.inv_std, step.finite)
            return step.output
        lam = self.lam.to(x.dtype)
        wm = None if self.bd is None else lam * self.bd.running_wm
        return operators.ce_eval(x, wm, ir.fc1.weight, ir.norm.weight, ir.norm.bias, ir.fc2.weight,
                           (1 - lam) * ir.running_inv_std, group_size=self._group_size(),
                           ln_eps=ir.norm.eps)

    def _group_size(self) -> int:
        return 1 if self.bd is None else self.bd.group_size

    def _reference(self, x: Tensor) -> Tensor:
        bd, ir = self.bd, self.ir
        inst_var = None if ir is None else CF.instance_variance(x)
        if self.training:
            wm, inv_std, finite = self._batch_estimates(x, inst_var)
            self._update_running(wm, inv_std, finite)
        else:
            wm = None if bd is None else bd.running_wm
            inv_std = None if ir is None else ir.running_inv_std
        diag = None if ir is None else ir.gate(inst_var) * inv_std
        if self.mode == "ce":
            lam = torch.sigmoid(self.theta)
            wm, diag = lam * wm, (1 - lam) * diag
        if self.identity_init:  # (1 − g)·x + g·CE(x) = (g·W + (1 − g)·I + Diag(g·d)) x
            g = self.gate
            diag = None if diag is None else g * diag
            if wm is None:
                diag = diag + (1 - g)
            else:
                eye = torch.eye(wm.shape[-1], dtype=wm.dtype, device=wm.device)
                wm = g * wm + (1 - g) * eye
        return CF.channel_equilibrium(x, wm, diag)

    def _batch_estimates(
        self, x: Tensor, inst_var: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """W (BD), (s + ε)^{-1/2} (IR) and a finiteness flag of the training batch, from its
        sufficient statistics after :meth:`_reduce_statistics`."""
        bd, ir = self.bd, self.ir
        bd_stats = None if bd is None else bd.statistics(x)
        ir_stats = None if ir is None else ir.statistics(inst_var)
        bd_stats, ir_stats = self._reduce_statistics(bd_stats, ir_stats)
        wm = inv_std = None
        finite = x.new_ones((), dtype=torch.bool)
        if bd is not None:
            wm, bd_finite = bd.matrix(bd_stats)
            finite = finite & bd_finite
        if ir is not None:
            inv_std, ir_finite = ir.scale(ir_stats)
            finite = finite & ir_finite
        return wm, inv_std, finite

    def _reduce_statistics(
        self, bd_stats: CF.GroupStatistics | None, ir_stats: CF.VarianceStatistics | None
    ) -> tuple[CF.GroupStatistics | None, CF.VarianceStatistics | None]:
        """The batch's statistics as the estimates use them: unchanged here; summed over all
        processes in :class:`~cenet.layers.sync_ce.SyncChannelEquilibrium`."""
        return bd_stats, ir_stats

    def _update_running(self, wm: Tensor | None, inv_std: Tensor | None, finite: Tensor) -> None:
        """The one place where the running estimates change (Eqn 32): raise for a non-finite
        batch (eager CPU), else blend in the statistics the forward used."""
        check_finite(finite, type(self).__name__)
        if self.bd is not None:
            self.bd.update_running(wm, finite)
        if self.ir is not None:
            self.ir.update_running(inv_std, finite)
