"""Small-matrix × feature-row products of the CE block, with compiled CPU kernels.

The CE block's heavy steps multiply many small channel-group matrices (g × g, g = 16) with
long feature rows (H·W positions). PyTorch's batched GEMMs reach a fraction of the CPU's
speed at these shapes, so on the CPU these products use C++ loops (``block_ops.cpp``) compiled
once per machine with :mod:`torch.utils.cpp_extension` (g++ and ninja; the build takes about half
a minute and is cached in ``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).
Every function here gives the same result without them, through ``torch.bmm``: on other
devices and dtypes, for groups of more than 64 channels, inside ``torch.compile``, when the
build fails (a warning says why), and
when the environment variable ``CENET_KERNELS=0`` turns them off. ``torch.utils.flop_counter``
counts them as the batched products they replace once they are loaded: call
:func:`kernels_available` before creating a ``FlopCounterMode`` (it copies the formulas then).

Functions (a feature map viewed as X (B, g, M): B = N·G channel groups of g rows, M = H·W):
    :func:`group_apply`: (W_{b mod G} + Diag(d_b)) X_b + c_b → (B, g, M)
    :func:`group_apply_pair`: (W1_{b mod G}ᵀ + Diag(d1_b)) X1_b + (W2_{b mod G} + Diag(d2_b)) X2_b
    + c_b → (B, g, M), in one pass
    :func:`group_gram`: Σ over samples of X_b Y_bᵀ per group (G, g, g), and the diagonals
    :func:`group_second_moments`: Σ over samples of X_b X_bᵀ per group, the row sums and sums of
    squares, in one pass
    :func:`row_moments`: sums and sums of squares of the rows of X (B, M) → (B,), (B,)
    :func:`ce_eval`: the eval-mode CE block of an (N, C, H, W) map, variances, gate and
    product per sample (no fallback: callers check :func:`kernels_usable`)
    :func:`stream_threshold`: outputs of this many bytes and more bypass the caches
    ``torch.ops.cenet_kernels.ce_operator``/``ce_step`` and their backwards: the CE block's
    training operator and whole training step (``ce_operator.cpp``, ``ce_step.cpp``; no
    fallback: :mod:`cenet.layers.ce_operator` calls them where :func:`kernels_usable` holds)
    ``torch.ops.cenet_kernels.max_pool_2x2`` and its backward: 2×2 max pooling without the
    index map (:func:`cenet.layers.pooling.max_pool_2x2` wraps them)
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ce_eval", "group_apply", "group_apply_pair", "group_gram", "group_second_moments",
           "kernels_available", "kernels_usable", "row_moments", "stream_threshold"]

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("block_ops.cpp")
_SOURCES = [_SOURCE, _SOURCE.with_name("ce_operator.cpp"), _SOURCE.with_name("ce_step.cpp")]
_DTYPES = (torch.float32, torch.float64)
_MAX_GROUP = 64  # kMaxGroup in block_ops.cpp: the largest g the kernels take
_state: dict[str, bool] = {}


def _build() -> bool:
    if os.environ.get("CENET_KERNELS", "1") == "0":
        return False
    # cpp_extension logs a CUDA warning when imported on a machine without CUDA; quiet it.
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        _log.info("building the CE block's CPU kernels (once per machine, about a minute)")
        cpp_extension.load(
            name="cenet_block_ops",
            sources=[str(path) for path in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - any build failure means: use the fallback
        warnings.warn(
            f"cenet: could not build the CPU kernels in {_SOURCE.parent} ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r}); the CE block "
            "falls back to torch.bmm (slower). Needs g++ and ninja; set CENET_KERNELS=0 to skip "
            "the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    finally:
        ext_log.setLevel(level)
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shape functions so that torch.export and torch.compile can trace the ops, and FLOP
    formulas for torch.utils.flop_counter (once)."""
    if _state.get("fakes"):
        return
    _state["fakes"] = True

    @torch.library.register_fake("cenet_kernels::group_apply")
    def _(w, x, diag, bias, transpose, out):
        return None

    @torch.library.register_fake("cenet_kernels::group_apply_pair")
    def _(w1, x1, d1, w2, x2, d2, bias, out):
        return None

    @torch.library.register_fake("cenet_kernels::group_gram")
    def _(x, y, groups, with_diag, symmetric, with_sums):
        b, g = x.shape[0], x.shape[1]
        return (x.new_empty(groups, g, g), x.new_empty(b if with_diag else 0, g),
                x.new_empty(b if with_sums else 0, g))

    @torch.library.register_fake("cenet_kernels::ce_eval")
    def _(x, w, fc1t, ln_w, ln_b, ln_eps, fc2t, scale, group_size, out):
        return None

    @torch.library.register_fake("cenet_kernels::max_pool_2x2")
    def _(x):
        return x.new_empty(x.shape[0], x.shape[1] // 2, x.shape[2] // 2)

    @torch.library.register_fake("cenet_kernels::max_pool_2x2_backward")
    def _(x, grad, accumulate, out):
        return None

    @torch.library.register_fake("cenet_kernels::row_moments")
    def _(x):
        return x.new_empty(x.shape[0]), x.new_empty(x.shape[0])

    # torch.utils.flop_counter counts the products as the batched matmuls they replace
    # (2 FLOPs per multiply-add); reductions such as row_moments count 0, as sums do there.
    from torch.utils.flop_counter import register_flop_formula

    def product_flops(first_shape, second_shape, *args, **kwargs) -> int:
        b, g, m = second_shape
        return 2 * b * g * g * m

    register_flop_formula(torch.ops.cenet_kernels.group_apply)(product_flops)
    register_flop_formula(torch.ops.cenet_kernels.group_gram)(product_flops)

    def pair_flops(w1_shape, x1_shape, d1_shape, w2_shape, *args, **kwargs) -> int:
        return (1 + (len(w2_shape) > 1 and w2_shape[0] > 0)) * product_flops(w1_shape, x1_shape)

    register_flop_formula(torch.ops.cenet_kernels.group_apply_pair)(pair_flops)

    def ce_eval_flops(x_shape, w_shape, fc1t_shape, ln_w, ln_b, ln_eps, fc2t_shape, scale,
                      group_size, *args, **kwargs) -> int:
        n, c, m = x_shape
        gate = 2 * n * 2 * c * fc1t_shape[1]  # the two gate layers, as linear layers count
        return 2 * n * c * group_size * m + gate

    register_flop_formula(torch.ops.cenet_kernels.ce_eval)(ce_eval_flops)

    # The training operator and step: the products they compute, as matmuls count (the
    # Newton iteration's g×g products, the covariance's μμᵀ, the gate's two layers; backward
    # the Newton steps' eight products each and the gate's four).
    def operator_flops(n: int, c: int, hd: int, groups: int, g: int, iters: int,
                       backward: bool) -> int:
        newton = (iters - 1) * (8 if backward else 3) * 2 * groups * g**3
        return 2 * groups * g * g + newton + (4 if backward else 2) * 2 * n * c * hd

    def ce_operator_flops(mean_bd, second, mean_ir, sq_ir, theta, fc1, ln_w, ln_b, fc2, eps_bd,
                          eps_ir, ln_eps, num_iters, *args, **kwargs) -> int:
        return operator_flops(*mean_bd, fc1[0], *second[:2], num_iters, False)

    def ce_operator_backward_flops(grad_wm, grad_d, mean_ir, fc1, ln_w, fc2, forward_out, *args,
                                   **kwargs) -> int:
        iters, groups, g, _ = forward_out[15]
        return operator_flops(*grad_d, fc1[0], groups, g, iters, True)

    def ce_step_flops(x, group_size, theta, fc1, ln_w, ln_b, fc2, eps_bd, eps_ir, ln_eps,
                      num_iters, *args, **kwargs) -> int:
        n, c, h, w = x
        products = 2 * (2 * n * c * group_size * h * w)  # moments and output
        return products + operator_flops(n, c, fc1[0], c // group_size, group_size, num_iters,
                                         False)

    def ce_step_backward_flops(grad, x, fc1, ln_w, fc2, saved, *args, **kwargs) -> int:
        n, c, h, w = x
        iters, groups, g, _ = saved[-1]
        products = 3 * (2 * n * c * g * h * w)  # gram and the input gradient's two products
        return products + operator_flops(n, c, fc1[0], groups, g, iters, True)

    for op, formula in ((torch.ops.cenet_kernels.ce_operator, ce_operator_flops),
                        (torch.ops.cenet_kernels.ce_operator_backward, ce_operator_backward_flops),
                        (torch.ops.cenet_kernels.ce_step, ce_step_flops),
                        (torch.ops.cenet_kernels.ce_step_backward, ce_step_backward_flops)):
        register_flop_formula(op)(formula)


def kernels_available() -> bool:
    """True if the compiled CPU kernels are built (building them on the first call)."""
    if "ok" not in _state:
        _state["ok"] = _build()
    return _state["ok"]


def kernels_usable(group_size: int, *tensors: Tensor) -> bool:
    """True if the kernels take these tensors: CPU, one dtype of float32/float64, groups of at
    most 64 channels, outside torch.compile, and the kernels built."""
    if torch.compiler.is_compiling() or group_size > _MAX_GROUP:
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in _DTYPES or t.dtype != tensors[0].dtype:
            return False
    return kernels_available()


def stream_threshold(nbytes: int | None = None) -> int:
    """The output size in bytes from which the compiled products write their output with
    non-temporal stores (bypassing the caches, for outputs that would evict their own inputs):
    by default half the last-level cache the machine reports, at least 12 MiB.

    Args:
        nbytes: a new threshold (0: every output), or None to leave it.

    Returns:
        The threshold before the call.

    Raises:
        RuntimeError: if the kernels are not built (see :func:`kernels_available`).
        ValueError: if ``nbytes`` is negative.
    """
    if nbytes is not None and nbytes < 0:
        raise ValueError(f"nbytes must be >= 0 (or None to read the threshold), got {nbytes}")
    if not kernels_available():
        raise RuntimeError("cenet.kernels.stream_threshold needs the compiled kernels, which are "
                           "not built")
    return torch.ops.cenet_kernels.stream_threshold(-1 if nbytes is None else nbytes)


def group_apply(
    w: Tensor,
    x: Tensor,
    diag: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    transpose: bool = False,
    shape: tuple[int, ...] | None = None,
) -> Tensor:
    """Y_b = (W_{b mod G} + Diag(d_b)) X_b + c_b for the B = N·G channel groups of a batch.

    Args:
        w: (G, g, g) group matrices, shared by the samples (used transposed if ``transpose``).
        x: (B, g, M) feature rows: batch b is group b mod G of sample b // G.
        diag: (B, g) per-batch diagonals d_b, or None.
        bias: (B, g) per-row constants c_b added at every position, or None.
        shape: shape of the returned tensor (B·g·M elements; default (B, g, M)). The result is
            allocated in this shape, not viewed into it, so that it can be returned from a
            custom autograd Function and then modified in place.

    Returns:
        Contiguous tensor in ``x``'s dtype. No autograd: callers define the backward.

    Raises:
        RuntimeError: for shapes that do not fit (B not a multiple of G, g of ``w`` and ``x``
            different, ``diag``/``bias`` not (B, g)), from the kernel or from ``torch.bmm``.
    """
    b, g, m = x.shape
    out = x.new_empty(shape if shape is not None else (b, g, m))
    if kernels_usable(x.shape[1], w, x):
        none = x.new_empty(0)
        d = none if diag is None else diag.to(x.dtype)
        c = none if bias is None else bias.to(x.dtype)
        torch.ops.cenet_kernels.group_apply(w, x, d, c, transpose, out)
        return out
    groups = w.shape[0]
    mats = w.transpose(1, 2) if transpose else w
    mats = mats.unsqueeze(0).expand(b // groups, groups, g, g)
    if diag is not None:
        mats = mats + torch.diag_embed(diag.to(x.dtype).view(b // groups, groups, g))
    mats = mats.reshape(b, g, g)
    flat = out.view(b, g, m)
    if bias is None:
        torch.bmm(mats, x, out=flat)
    else:
        torch.baddbmm(bias.to(x.dtype).unsqueeze(-1), mats, x, out=flat)
    return out


def group_apply_pair(
    w1: Tensor,
    x1: Tensor,
    d1: Tensor | None,
    w2: Tensor | None,
    x2: Tensor,
    d2: Tensor | None,
    bias: Tensor | None = None,
) -> Tensor:
    """Y_b = (W1_{b mod G}ᵀ + Diag(d1_b)) X1_b + (W2_{b mod G} + Diag(d2_b)) X2_b + c_b.

    Two group products summed in one pass over the feature maps (the CE block's input
    gradient: through its product, W1 = A, X1 = dY, and through its moments, X2 = X).

    Args:
        w1, w2: (G, g, g) group matrices (``w1`` used transposed); ``w2`` None: no W2 term,
            the second product is the diagonal Diag(d2_b) X2_b.
        x1, x2: (B, g, M) feature rows of one shape, B = N·G.
        d1, d2: (B, g) per-batch diagonals, or None.
        bias: (B, g) per-row constants, or None.

    Returns:
        Contiguous (B, g, M) tensor in ``x1``'s dtype. No autograd.

    Raises:
        RuntimeError: for shapes or dtypes that do not fit.
    """
    if kernels_usable(x1.shape[1], w1, x1, x2, *([] if w2 is None else [w2])):
        none = x1.new_empty(0)
        out = torch.empty_like(x1, memory_format=torch.contiguous_format)
        torch.ops.cenet_kernels.group_apply_pair(
            w1, x1, none if d1 is None else d1.to(x1.dtype), none if w2 is None else w2, x2,
            none if d2 is None else d2.to(x1.dtype), none if bias is None else bias.to(x1.dtype),
            out,
        )
        return out
    out = group_apply(w1, x1, d1, bias, transpose=True)
    if w2 is not None:
        return out.add_(group_apply(w2, x2, d2))
    return out if d2 is None else out.addcmul_(x2, d2.to(x1.dtype).unsqueeze(-1))


def group_gram(
    x: Tensor, y: Tensor, groups: int, *, with_diag: bool = False, symmetric: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Σ_{b mod G = j} X_b Y_bᵀ for each group j, and the per-batch diagonals of X_b Y_bᵀ.

    Args:
        x, y: (B, g, M) feature rows, B = N·G (``symmetric``: ``y`` is ``x``; half the work).
        groups: G.
        with_diag: also return diag(X_b Y_bᵀ) (B, g).

    Returns:
        ((G, g, g) sums over the samples, (B, g) diagonals or None).

    Raises:
        RuntimeError: if ``x`` and ``y`` differ in shape or B is not a multiple of G.
    """
    if kernels_usable(x.shape[1], x, y):
        total, diag, _ = torch.ops.cenet_kernels.group_gram(
            x, y, groups, with_diag, symmetric, False
        )
        return total, (diag if with_diag else None)
    b, g, m = x.shape
    per = torch.bmm(x, y.transpose(1, 2))
    total = per.view(b // groups, groups, g, g).sum(0)
    return total, (per.diagonal(dim1=1, dim2=2) if with_diag else None)


def group_second_moments(x: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """The moments of the CE block's statistics in one pass over X (B, g, M), B = N·G:
    Σ_n X_b X_bᵀ per group (G, g, g) and the row sums and sums of squares (B, g) of every
    batch (no autograd; :class:`cenet.layers.moments._MomentsNCHW` wraps it).

    Raises:
        RuntimeError: if B is not a multiple of ``groups``.
    """
    if kernels_usable(x.shape[1], x):
        second, squares, sums = torch.ops.cenet_kernels.group_gram(x, x, groups, True, True, True)
        return second, sums, squares
    b, g, m = x.shape
    second = torch.bmm(x, x.transpose(1, 2)).view(b // groups, groups, g, g).sum(0)
    return second, x.sum(2), torch.linalg.vector_norm(x, dim=2).square()


def row_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sum and sum of squares of each row of X (B, M), in one pass: two (B,) tensors in
    ``x``'s dtype (no autograd; :func:`cenet.layers.moments.spatial_variance` wraps it).

    Raises:
        RuntimeError: if ``x`` is not 2-D.
    """
    if kernels_usable(0, x):
        return torch.ops.cenet_kernels.row_moments(x)
    return x.sum(1), torch.linalg.vector_norm(x, dim=1).square()


def ce_eval(
    x: Tensor,
    wm: Tensor | None,
    fc1t: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    ln_eps: float,
    fc2t: Tensor,
    scale: float,
    group_size: int,
) -> Tensor:
    """The eval-mode CE block in one pass of the compiled kernel (CE paper, Eqns 4, 7, 8, 21).

    y_n = (W + Diag(d_n)) x_n with d_n = scale · Sigmoid(fc2 ReLU(LN(fc1 σ̃²_n))), σ̃²_n the
    population variances of the channels of sample n over H×W. The caller folds λ into W and
    (1 − λ)·running_inv_std into ``scale``. Each sample's variances, gate and product are
    computed while the sample is in cache. No autograd: for inference (``torch.no_grad``).

    Args:
        x: (N, C, H, W) NCHW-contiguous input.
        wm: (C/g, g, g) BD matrices, or None (IR only).
        fc1t: (C, Hd) first gate layer, transposed; ``ln_weight``, ``ln_bias``: (Hd,) LayerNorm
            affine; ``fc2t``: (Hd, C) second gate layer, transposed (each layer is then a
            product of the samples' rows with its rows). All in ``x``'s dtype.
        ln_eps: ε of the LayerNorm.
        scale: factor of the IR weights.
        group_size: g.

    Returns:
        (N, C, H, W) tensor in ``x``'s dtype.

    Raises:
        RuntimeError: if the kernels are not built (see :func:`kernels_usable`) or the shapes
            or dtypes do not fit.
    """
    if not kernels_available():
        raise RuntimeError("cenet.kernels.ce_eval needs the compiled kernels, which are not built")
    n, c, h, w = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ops.cenet_kernels.ce_eval(
        x.reshape(n, c, h * w), x.new_empty(0) if wm is None else wm, fc1t, ln_weight, ln_bias,
        ln_eps, fc2t, scale, group_size, out,
    )
    return out
