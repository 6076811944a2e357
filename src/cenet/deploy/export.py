"""Export for deployment: ``torch.export`` programs (``.pt2``) and ONNX files of a network,
and their parity with the eager model.

Both formats trace the network in eval mode with a dynamic batch dimension (by default) and
the CE native CPU kernels turned off (:func:`cenet.kernels.use_isa` ``(None)``), so a CE block
becomes standard operators: a portable ``.pt2`` holds ``aten`` operators only and loads with
plain ``torch`` (no ``cenet`` import), and an ONNX file holds operators of the default ONNX
domain only (``Conv``, ``MatMul``, ``LayerNormalization``, ``Sigmoid``, ...), so any ONNX
runtime runs it. Call :func:`cenet.deploy.fuse` first to fold BN/BD/IterNorm/DBN into the
convolutions.

ONNX needs the optional packages ``onnx`` and ``onnxscript`` (export) and ``onnxruntime``
(:func:`onnx_session`): ``pip install 'cenet[export]'``.

What cannot be exported meaningfully (:func:`check_exportable`): a batch norm without running
statistics (``track_running_stats=False``) normalizes with the statistics of the batch even
in eval, so a deployed model's output for one image would depend on the other images of its
batch; the cenet layers (CE, BD, IR, IterNorm, DBN, SE, GCT) all have an eval form from their
running buffers, so none of them is refused. Non-finite weights or buffers (a diverged run)
are refused too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from cenet import kernels

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'cenet[export]'"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
METADATA_FILE = "cenet.json"
"""Name of the ``extra_files`` entry of a ``.pt2`` that holds :func:`save_program`'s metadata."""


def check_exportable(model: nn.Module) -> None:
    """Refuse a network whose eval output is not a fixed function of each image.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: for a batch norm without running statistics (it uses the batch's
            statistics in eval too), or non-finite parameters or buffers; the message names
            the modules or tensors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module to export, got {type(model).__name__}")
    batch_stats = [name or type(model).__name__ for name, m in model.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and (m.running_mean is None or m.running_var is None)]
    if batch_stats:
        raise ValueError(
            f"cannot export {type(model).__name__}: {_names(batch_stats)} normalize with the "
            "statistics of the batch even in eval (track_running_stats=False), so an exported "
            "model's output for one image would depend on the rest of its batch; build them "
            "with track_running_stats=True and train (or set running_mean/running_var)"
        )
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = [n for n, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(
            f"cannot export {type(model).__name__}: {_names(bad)} hold NaN or Inf values "
            "(a diverged training run?); export a checkpoint with finite weights"
        )


def _names(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def example_input(model: nn.Module, image_size: int, batch_size: int = 2,
                  *, seed: int = 0) -> Tensor:
    """A reproducible random batch for ``model``: (batch_size, 3, image_size, image_size),
    standard normal, in the dtype and on the device of the model's first floating parameter
    (float32 on the CPU if it has none).

    Raises:
        ValueError: if ``image_size`` or ``batch_size`` is not a positive integer.
    """
    for name, value in (("image_size", image_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype, device = (torch.float32, "cpu") if ref is None else (ref.dtype, ref.device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen, dtype=dtype)
    return x.to(device)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def export_program(
    model: nn.Module,
    *,
    image_size: int,
    batch_size: int = 2,
    dynamic_batch: bool = True,
    portable: bool = True,
) -> ExportedProgram:
    """``torch.export.export`` of ``model``'s eval forward on (B, 3, S, S) images.

    The model is switched to eval for the trace (and back to training afterwards if it was
    training); the program shares the model's parameter and buffer tensors (no copy). It
    runs with grad enabled or not (``program.module()(x)``); save it with
    :func:`save_program`.

    Args:
        model: the network (also a fused copy from :func:`cenet.deploy.fuse`); see
            :func:`check_exportable`.
        image_size: S, the input side in pixels (fixed in the program).
        batch_size: B of the example batch traced (>= 2 with ``dynamic_batch``: torch.export
            specializes a size-1 dimension).
        dynamic_batch: the batch dimension is symbolic (named ``"batch"``, any size >= 1).
        portable: trace with the CE native kernels off (``aten`` operators only, loads without
            cenet). False traces under ``torch.no_grad`` with the kernels active where they
            run: CE blocks become the custom op ``cenet::ce_eval``, faster on the CPU, and
            loading the program needs ``import cenet``.

    Returns:
        The ``ExportedProgram``; its input is (B, 3, S, S), its output the model's (B, classes).

    Raises:
        TypeError, ValueError: from :func:`check_exportable`; ValueError for bad sizes, or if
            ``torch.export`` cannot trace the model (the message has its reason).
    """
    check_exportable(model)
    if dynamic_batch and batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for a dynamic batch (torch.export "
                         f"specializes a dimension of size 1), got {batch_size}")
    x = example_input(model, image_size, batch_size)
    shapes = ({0: Dim(BATCH_DIM, min=1)},) if dynamic_batch else None
    mode = kernels.use_isa(None) if portable else torch.no_grad()
    with _eval_mode(model), mode:
        try:
            program = torch.export.export(model, (x,), dynamic_shapes=shapes)
        except Exception as err:  # export fails in many exception types; say which and why
            raise ValueError(f"torch.export could not export {type(model).__name__}: "
                             f"{type(err).__name__}: {_first_line(err)}") from err
    if portable and (custom := native_ops(program)):
        raise ValueError(f"the portable program holds cenet operators {sorted(custom)}")
    return program


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def program_ops(program: ExportedProgram) -> set[str]:
    """The operators a program calls, as ``"namespace.name.overload"`` strings (e.g.
    ``"aten.convolution.default"``), including those of nested graphs (autocast regions)."""
    ops = set()
    for gm in program.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return ops


def native_ops(program: ExportedProgram) -> set[str]:
    """The operators of ``program`` from cenet's libraries (``cenet::*``, the kernels'
    ``cenet_kernels_<isa>::*``): non-empty means loading it needs ``import cenet``."""
    return {op for op in program_ops(program) if op.startswith("cenet")}


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path whose parent exists (created) and which is not a directory.

    Raises:
        ValueError: if ``path`` is a directory, or its parent cannot be created (a file is in
            the way, no permission).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write {path}: cannot create its directory ({err})") from None
    return path


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary name next to ``path`` to write to; renamed to ``path`` on success, removed
    on error, so ``path`` is either the complete new file or left as it was.

    Raises:
        ValueError: if the directory is not writable (see :func:`check_output_path`).
    """
    path = check_output_path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        tmp.touch(exist_ok=False)
    except OSError as err:
        raise ValueError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_program(program: ExportedProgram, path: str | os.PathLike[str],
                 *, metadata: str | None = None) -> Path:
    """Write ``program`` with ``torch.export.save`` (atomically: the file is complete or
    absent). Load it with ``torch.export.load`` (:func:`load_program`).

    Args:
        metadata: text stored in the archive as extra file :data:`METADATA_FILE`
            (e.g. JSON naming the model), or None.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: if ``path`` cannot be written (a directory, no permission).
    """
    extra = None if metadata is None else {METADATA_FILE: metadata}
    with _atomic_target(path) as tmp:
        torch.export.save(program, tmp, extra_files=extra)
    return Path(path)


def load_program(path: str | os.PathLike[str]) -> ExportedProgram:
    """``torch.export.load(path)``.

    Raises:
        FileNotFoundError: if there is no such file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"exported program {path} does not exist")
    return torch.export.load(path)


def require_onnx(*, runtime: bool = True) -> None:
    """Check that the ONNX packages are installed: ``onnx`` and ``onnxscript`` (export) and,
    with ``runtime``, ``onnxruntime``.

    Raises:
        ImportError: naming the missing package and ``pip install 'cenet[export]'``.
    """
    _require("onnx", "onnxscript", *(["onnxruntime"] if runtime else []), what="ONNX export")


def _require(*modules: str, what: str) -> None:
    for name in modules:
        try:
            __import__(name)
        except ImportError as err:
            raise ImportError(f"{what} needs the package {name!r}, which is not installed: "
                              f"{INSTALL_HINT}") from err


def export_onnx(
    model: nn.Module | ExportedProgram,
    path: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    dynamic_batch: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` to an ONNX file with ``torch.onnx.export(dynamo=True)`` (onnxscript).

    The file holds the weights (no external data file), the input ``"input"`` (B, 3, S, S)
    and the output ``"logits"`` (B, classes), B named ``"batch"`` when dynamic, and default
    ONNX domain operators only (checked). Written atomically.

    Args:
        model: a network (exported first with :func:`export_program` ``(portable=True)``)
            or a portable program from it (its dynamic batch and image size are kept).
        path: the ``.onnx`` file to write.
        image_size: S; required for a network.
        dynamic_batch: for a network, a symbolic batch dimension.
        metadata: key/value strings stored in the model's ``metadata_props``.

    Returns:
        ``path`` as a Path.

    Raises:
        ImportError: if ``onnx`` or ``onnxscript`` is missing (names ``pip install
            'cenet[export]'``).
        ValueError: for a model :func:`export_program` refuses, a program with cenet
            operators, a failed conversion, operators outside the default ONNX domain (the
            file is not written), or an unwritable ``path``.
    """
    _require("onnx", "onnxscript", what="ONNX export")
    import onnx

    check_output_path(path)
    if isinstance(model, ExportedProgram):
        program = model
        if custom := native_ops(program):
            raise ValueError(f"the program holds cenet operators {sorted(custom)}, which ONNX "
                             "does not have; export it with portable=True")
    else:
        if image_size is None:
            raise ValueError("image_size is required to export a network to ONNX")
        program = export_program(model, image_size=image_size, dynamic_batch=dynamic_batch)
    with _atomic_target(path) as tmp:
        _to_onnx(program, tmp)
        proto = onnx.load(tmp)
        foreign = sorted({f"{d}::{op}" for d, op in onnx_ops(proto) if d not in ("", "ai.onnx")})
        if foreign or proto.functions:
            names = foreign + [f"function {f.domain}::{f.name}" for f in proto.functions]
            raise ValueError(f"the ONNX graph uses operators outside the default domain: "
                             f"{', '.join(names)}; no file written")
        _name_batch_dim(proto)
        for key, value in (metadata or {}).items():
            proto.metadata_props.add(key=str(key), value=str(value))
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
    return Path(path)


def _to_onnx(program: ExportedProgram, path: Path) -> None:
    """Convert with the kernels off; torch.onnx's progress text goes to the debug log."""
    chatter = io.StringIO()
    with kernels.use_isa(None), contextlib.redirect_stdout(chatter):
        try:
            torch.onnx.export(program, (), str(path), dynamo=True, external_data=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              verbose=False)
        except Exception as err:  # conversion errors come in many types
            raise ValueError(f"ONNX conversion failed: {type(err).__name__}: "
                             f"{_first_line(err)}") from err
        finally:
            if chatter.getvalue():
                logger.debug("torch.onnx: %s", chatter.getvalue())


def _name_batch_dim(proto: Any) -> None:
    """Rename the input's symbolic batch dimension (torch's ``s0``-like symbol) to
    :data:`BATCH_DIM` wherever the graph's shapes mention it."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    symbol = dims[0].dim_param if dims else ""
    if not symbol or symbol == BATCH_DIM:
        return
    graph = proto.graph
    for info in (*graph.input, *graph.output, *graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = BATCH_DIM


def onnx_ops(model: Any) -> set[tuple[str, str]]:
    """``(domain, op_type)`` of every node of an ONNX model (a ``ModelProto`` or a file path),
    including nested subgraphs and model-local functions; domain ``""`` is the default one.

    Raises:
        ImportError: if ``onnx`` is missing.
    """
    _require("onnx", what="reading an ONNX file")
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
    ops: set[tuple[str, str]] = set()

    def walk(nodes: Any) -> None:
        for node in nodes:
            ops.add((node.domain, node.op_type))
            for attr in node.attribute:
                for graph in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                    walk(graph.node)

    walk(proto.graph.node)
    for function in proto.functions:
        walk(function.node)
    return ops


def onnx_session(path: str | os.PathLike[str], *, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path`` on the CPU execution provider.

    Args:
        threads: intra-op threads (None: onnxruntime's default).

    Raises:
        ImportError: if ``onnxruntime`` is missing (names ``pip install 'cenet[export]'``).
        FileNotFoundError: if there is no such file.
    """
    _require("onnxruntime", what="running an ONNX file")
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _runner(artifact: Any) -> Callable[[Tensor], Tensor]:
    """A function images -> outputs for any artifact :func:`parity` takes."""
    if isinstance(artifact, ExportedProgram):
        return artifact.module()
    if isinstance(artifact, nn.Module):
        return artifact
    if isinstance(artifact, str | os.PathLike):
        suffix = Path(artifact).suffix.lower()
        if suffix == ".onnx":
            artifact = onnx_session(artifact)
        elif suffix == ".pt2":
            return load_program(artifact).module()
        else:
            raise ValueError(f"cannot tell the format of {artifact}: expected .onnx or .pt2")
    if hasattr(artifact, "run") and hasattr(artifact, "get_inputs"):  # an ORT session
        session = artifact
        name = session.get_inputs()[0].name

        def run(x: Tensor) -> Tensor:
            feed = {name: x.detach().cpu().contiguous().numpy()}
            return torch.from_numpy(session.run(None, feed)[0])

        return run
    raise TypeError(f"parity takes an ExportedProgram, an nn.Module, an ONNX Runtime session "
                    f"or a .pt2/.onnx path, got {type(artifact).__name__}")


def parity(reference_model: nn.Module, artifact: Any, x: Tensor) -> float:
    """How far ``artifact``'s output on ``x`` is from ``reference_model``'s eval output:
    max |artifact − reference| / max |reference|, computed in float64 (the absolute
    max |difference| if the reference output is all zeros).

    Args:
        reference_model: the eager network (run in eval under ``torch.no_grad``, then
            restored to its mode).
        artifact: an ``ExportedProgram``, a module (e.g. the fused copy), an ONNX Runtime
            session, or the path of a ``.pt2`` or ``.onnx`` file.
        x: (B, 3, S, S) images, on the reference model's device (an ONNX session gets a CPU
            copy).

    Returns:
        The relative error (0.0 for identical outputs; ~1e-7 is float32 round-off).

    Raises:
        ValueError: if the two outputs differ in shape, or the path's format is unknown.
        TypeError: for an artifact of another kind.
    """
    run = _runner(artifact)
    with torch.no_grad(), _eval_mode(reference_model):
        ref = reference_model(x)
        out = run(x)
    ref, out = ref.detach().double().cpu(), out.detach().double().cpu()
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: reference {tuple(ref.shape)}, "
                         f"artifact {tuple(out.shape)}")
    diff = (out - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    if math.isnan(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


def randomize_eval_state(model: nn.Module, *, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Move ``model``'s 1-D parameters (norm affines, CE's θ, GCT's α, γ, β) and running
    buffers (means, variances, IR scales, whitening matrices) off their initial values, in
    place and deterministically, and put it in eval mode: a parity check of a fused or
    exported copy of an untrained network then meets no identity map and no gate of exactly 1.
    (Training forwards would do it too, but whitening on the few positions of a deep layer at
    32×32 gives near-singular estimates that overflow the eval output of the deep DBN nets.)

    Returns:
        ``model``.
    """
    torch.manual_seed(seed)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1:
                p.add_(scale * torch.randn_like(p))
        for key, b in model.named_buffers():
            leaf = key.rsplit(".", 1)[-1]
            if leaf == "running_mean":
                b.add_(scale * torch.randn_like(b))
            elif leaf in ("running_var", "running_inv_std"):
                b.mul_(torch.empty_like(b).uniform_(0.5, 1.5))
            elif leaf == "running_wm":
                b.add_(scale / 2 * torch.randn_like(b))
    return model
