"""Gated Channel Transformation (GCT), a baseline channel block (Yang et al., CVPR 2020;
the GCT paper, Eqns 1-5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cenet.layers._validate import check_eps, check_input, check_positive_int
from cenet.layers.functional import no_autocast

GCT_MODES = ("l2", "l1")
GCT_NO_DECAY = ("beta", "all")


class GatedChannelTransformation(nn.Module):
    """GCT x̂ = F(x | α, γ, β) = x ⊙ [1 + tanh(γ ŝ + β)] (GCT paper, Eqns 1-4).

    Per sample n and channel c, with α, γ, β ∈ R^C:

    - global context embedding (Eqn 2): ``"l2"`` mode s_c = α_c (Σ_ij x_c,ij² + ε)^{1/2};
      ``"l1"`` mode s_c = α_c Σ_ij |x_c,ij| (the embedding ablation of the paper's Table 5a);
    - channel normalization (Eqn 3): ŝ_c = √C · s_c / (Σ_c s_c² + ε)^{1/2}, the ℓ2
      normalization across channels, in *both* modes. The paper defines only this ℓ2 channel
      normalization and ablates the embedding norm (Table 5a) and the normalization
      (Table 5b) separately, so ``"l1"`` changes the embedding only. (The authors' released
      code instead pairs its ``"l1"`` embedding with an ℓ1 normalization γ_c s_c /
      (mean_c |s_c| + ε), and puts its ε as (mean_c s_c² + ε)^{1/2}, i.e. C·ε in Eqn 3's
      terms; this layer follows the paper's equations.)
    - gating adaptation (Eqn 4): x̂_c = x_c · (1 + tanh(γ_c ŝ_c + β_c)).

    α starts at 1 and γ, β at 0 (paper appendix A), so the gate is exactly 1 and the layer is
    an exact identity at initialization (Eqn 5). The paper applies GCT before every
    convolution, warms up at lr 0.01 for one epoch and advises no weight decay on β (see
    :func:`gct_param_groups`). The embedding and normalization are computed in ``x``'s dtype
    promoted to at least float32 (a sum of squares over H×W overflows float16), also under
    autocast; the gate is cast back to ``x``'s dtype. The output keeps the input's memory
    layout (NCHW or channels-last).

    Args:
        num_features: C, channels of the (N, C, H, W) input.
        mode: embedding norm, ``"l2"`` (paper default) or ``"l1"``.
        eps: ε of Eqns 2 and 3.
        device, dtype: factory arguments of the parameters.

    Shape:
        input (N, C, H, W), output (N, C, H, W); parameters ``alpha``, ``gamma``, ``beta``
        (C,) each.

    Raises:
        ValueError: in ``__init__`` for an unknown mode (the message lists the valid ones), a
            non-positive ``num_features`` or ``eps``; in ``forward`` for a non-4D input or a
            wrong channel count.
    """

    def __init__(
        self,
        num_features: int,
        *,
        mode: str = "l2",
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("num_features", num_features)
        if mode not in GCT_MODES:
            raise ValueError(f"unknown GCT mode {mode!r}; valid modes are {GCT_MODES}")
        check_eps(eps)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.mode = mode
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(num_features, **factory))
        self.gamma = nn.Parameter(torch.zeros(num_features, **factory))
        self.beta = nn.Parameter(torch.zeros(num_features, **factory))

    def extra_repr(self) -> str:
        return f"{self.num_features}, mode={self.mode!r}, eps={self.eps}"

    def embedding(self, x: Tensor) -> Tensor:
        """s (N, C): the global context embedding of Eqn 2 (α-weighted ℓ2 or ℓ1 norms)."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.mode == "l2":
            norm = (xf.square().sum((2, 3)) + self.eps).sqrt()
        else:
            norm = xf.abs().sum((2, 3))
        return norm * self.alpha.to(norm.dtype)

    def channel_normalize(self, s: Tensor) -> Tensor:
        """ŝ (N, C) = √C · s / (Σ_c s_c² + ε)^{1/2}: the channel normalization of Eqn 3."""
        return s * (math.sqrt(self.num_features) * (s.square().sum(1, keepdim=True) + self.eps)
                    .rsqrt())

    def gate(self, x: Tensor) -> Tensor:
        """1 + tanh(γ ŝ + β), (N, C), in ``x``'s dtype promoted to at least float32 (Eqn 4)."""
        with no_autocast(x.device):
            s_hat = self.channel_normalize(self.embedding(x))
            dtype = s_hat.dtype
            return 1 + torch.tanh(self.gamma.to(dtype) * s_hat + self.beta.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        return x * self.gate(x).to(x.dtype)[:, :, None, None]


def gct_no_decay_parameters(model: nn.Module, which: str = "beta") -> list[nn.Parameter]:
    """The parameters of the GCT modules in ``model`` to exempt from weight decay.

    The GCT paper (appendix A) advises not to apply weight decay to β. ``cenet train`` puts
    these parameters in a group with ``weight_decay=0`` (config key ``gct_no_wd``); with plain
    PyTorch, pass them to the optimizer as a group of their own.

    Args:
        model: any network; only :class:`GatedChannelTransformation` modules are looked at.
        which: ``"beta"`` (the paper's advice) or ``"all"`` (α, γ and β).

    Returns:
        The selected parameters, each once, in ``model.modules()`` order (empty for a model
        without GCT).

    Raises:
        ValueError: for an unknown ``which`` (the message lists the valid ones).
    """
    if which not in GCT_NO_DECAY:
        raise ValueError(f"unknown GCT no-decay choice {which!r}; valid values are {GCT_NO_DECAY}")
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, GatedChannelTransformation):
            for p in (module.beta,) if which == "beta" else module.parameters():
                params.setdefault(id(p), p)
    return list(params.values())
