"""The four ways ``cenet bench`` runs a network in eval (:data:`BACKENDS`):

- ``eager``: the eval model as it is;
- ``compile``: ``torch.compile(model, dynamic=False)`` of the eval model (inductor; one
  compilation per batch size; the CE block enters the graph as the custom op
  ``cenet::ce_eval``);
- ``fused``: :func:`cenet.deploy.fuse`'s copy (BN, and BD where it folds, folded into the
  convolutions), eager;
- ``onnx``: the fused copy exported to ONNX by :func:`cenet.deploy.export.export_onnx`
  (dynamo exporter with the CE kernels off, so the graph holds standard ops only; dynamic
  batch) and run by ONNX Runtime (CPU execution provider with ``threads`` intra-op threads
  that do not spin between runs; on CUDA the CUDA provider, with the input copied from host
  memory in each call).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "fused", "onnx")


def ort_skip_reason(device: torch.device) -> str | None:
    """Why the ``onnx`` backend cannot run on ``device`` here, or None if it can."""
    missing = [m for m in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(m)
               is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    if device.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("this onnxruntime has no CUDAExecutionProvider (providers: "
                    f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
    return None


def export_fused(fused: nn.Module, path: Path, image_size: int) -> Path:
    """Export the fused network (a CPU copy of it) to ``path`` with a dynamic batch; the
    exporter's progress messages go to the debug log, not to stdout."""
    from cenet.deploy.export import export_onnx

    model = copy.deepcopy(fused).to("cpu") if _device_of(fused).type != "cpu" else fused
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        out = Path(export_onnx(model, path, image_size=image_size, dynamic_batch=True))
    log.debug("%s", chatter.getvalue())
    return out


def ort_session(path: Path, *, threads: int, device: torch.device) -> Any:
    """An ONNX Runtime session of ``path`` (as :func:`cenet.deploy.export.onnx_session` makes
    one) with ``threads`` intra-op threads that do not spin after a run: spinning threads of
    one session would take the cores from the network timed next (measured: ResNet-50 at
    batch 1 alternated between 29 and 48 ms with the order of the networks). On ``device``
    cuda, the CUDA execution provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    return ort.InferenceSession(str(path), opts, providers=[provider])


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def build_runners(members: list[str], backends: list[str], models: dict[str, nn.Module],
                  fused: dict[str, nn.Module], sessions: dict[str, Any], x: torch.Tensor,
                  ) -> tuple[dict[tuple[str, str], Callable[[], Any]], dict[tuple[str, str], str]]:
    """One zero-argument callable per (network, backend) running one forward of ``x``, each
    called once here (compilation, first-run allocations); and the pairs that could not be
    built or run, with why (a compilation or export error: the measurement goes on without
    them). Call under ``torch.inference_mode()``."""
    runners: dict[tuple[str, str], Callable[[], Any]] = {}
    skipped: dict[tuple[str, str], str] = {}
    for backend in backends:
        for name in members:
            try:
                if backend == "eager":
                    fn = functools.partial(models[name], x)
                elif backend == "compile":
                    fn = functools.partial(torch.compile(models[name], dynamic=False), x)
                elif backend == "fused":
                    fn = functools.partial(fused[name], x)
                else:
                    if name not in sessions:
                        raise RuntimeError("no ONNX file (its export failed)")
                    sess = sessions[name]
                    feed = {sess.get_inputs()[0].name: x.detach().contiguous().cpu().numpy()}
                    fn = functools.partial(sess.run, None, feed)
                fn()
            except Exception as err:  # noqa: BLE001 - one failing backend must not end the run
                log.warning("%s %s: skipped (%s)", name, backend, _first_line(err))
                skipped[(name, backend)] = _first_line(err)
                continue
            runners[(name, backend)] = fn
    return runners, skipped
