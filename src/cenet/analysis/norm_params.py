"""Parameter conditions of normalization layers: small γ and non-positive β (CE paper Sec. 2,
appendix Tables 6 and 9)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from cenet.analysis._common import to_jsonable
from cenet.analysis.selection import LayerSpec, select_modules
from cenet.layers import DecorrelatedBatchNorm, IterNorm

NORM_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    nn.GroupNorm,
    _InstanceNorm,
    nn.LayerNorm,
    IterNorm,
    DecorrelatedBatchNorm,
)
"""The default selection of :func:`norm_parameter_conditions`."""


@dataclass
class NormConditions:
    """Conditions of the affine γ (``weight``) and β (``bias``) of normalization layers.

    ``gamma_small``: ratio of |γ_c| < t; ``gamma_below``: ratio of signed γ_c < t (the paper's
    literal "γ_c < 0.1", which also counts every negative γ); ``beta_nonpositive``: ratio of
    β_c ≤ b; all in [0, 1]. ``num_channels`` is C (or the pooled count overall).
    """

    num_channels: int
    gamma_small: float
    gamma_below: float
    beta_nonpositive: float


@dataclass
class NormParameterConditions:
    """Result of :func:`norm_parameter_conditions`: per layer, pooled over all channels of all
    layers (``overall``, as the paper's "over all BN layers"), and the unweighted mean of the
    layer ratios (``layer_mean``)."""

    layers: dict[str, NormConditions]
    overall: NormConditions
    layer_mean: NormConditions
    gamma_threshold: float
    beta_threshold: float

    def to_dict(self) -> dict:
        """A JSON-serializable dict."""
        return to_jsonable(self)


def _affine(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not (isinstance(weight, Tensor) and isinstance(bias, Tensor)):
        return None
    if weight.dim() != 1 or weight.shape != bias.shape:
        return None
    return weight.detach().double(), bias.detach().double()


def norm_parameter_conditions(
    model: nn.Module,
    *,
    layers: LayerSpec | None = None,
    gamma_threshold: float = 0.1,
    beta_threshold: float = 0.0,
) -> NormParameterConditions:
    """Ratios of γ_c < 0.1 and β_c ≤ 0 of the normalization layers (CE paper Tables 6, 9).

    By default every BatchNorm, GroupNorm, InstanceNorm, LayerNorm, :class:`IterNorm` and
    :class:`DecorrelatedBatchNorm` with 1-D affine ``weight`` γ and ``bias`` β of equal size C
    is measured; the others (``affine=False``, multi-dimensional LayerNorm shapes) are skipped.
    Both |γ| < t (``gamma_small``) and signed γ < t (``gamma_below``) are reported: the paper
    writes γ_c < 0.1, but a negative γ does not make a channel small, so |γ| is the condition
    of Remark 1.

    Raises:
        ValueError: for an empty selection, if no selected module has a 1-D affine
            ``weight``/``bias``, or if an explicitly selected module (``layers`` given) has
            none (the message names it).
    """
    modules = select_modules(model, layers, default=NORM_TYPES)
    per_layer: dict[str, NormConditions] = {}
    counts = [0, 0, 0, 0]
    for name, module in modules.items():
        affine = _affine(module)
        if affine is None:
            if layers is not None:
                raise ValueError(
                    f"module {name!r} ({type(module).__name__}) has no 1-D affine weight/bias"
                )
            continue
        gamma, beta = affine
        c = gamma.numel()
        small = int((gamma.abs() < gamma_threshold).sum())
        below = int((gamma < gamma_threshold).sum())
        nonpos = int((beta <= beta_threshold).sum())
        per_layer[name] = NormConditions(c, small / c, below / c, nonpos / c)
        for i, v in enumerate((c, small, below, nonpos)):
            counts[i] += v
    if not per_layer:
        raise ValueError(
            f"no selected module has 1-D affine weight/bias; selected {list(modules)[:12]}"
        )
    total = counts[0]
    overall = NormConditions(total, counts[1] / total, counts[2] / total, counts[3] / total)
    n = len(per_layer)
    layer_mean = NormConditions(
        total,
        sum(v.gamma_small for v in per_layer.values()) / n,
        sum(v.gamma_below for v in per_layer.values()) / n,
        sum(v.beta_nonpositive for v in per_layer.values()) / n,
    )
    return NormParameterConditions(
        per_layer, overall, layer_mean, float(gamma_threshold), float(beta_threshold)
    )
