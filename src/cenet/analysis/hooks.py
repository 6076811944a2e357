"""Forward hooks that are always removed: the base of every activation measurement."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from cenet.analysis.selection import LayerSpec, select_modules

OutputHook = Callable[[str, nn.Module, tuple, Any], Any]
"""``hook(key, module, inputs, output)``; a non-``None`` return value replaces the output."""


def call_key(name: str, index: int) -> str:
    """The key of the ``index``-th call (0-based) of module ``name`` within one forward pass:
    ``name`` for the first call, ``"name:1"``, ``"name:2"``, ... for the later ones (a module
    applied several times, like the shared ``relu`` of torchvision's ResNet blocks)."""
    return name if index == 0 else f"{name}:{index}"


@contextmanager
def forward_hooks(
    model: nn.Module, modules: Mapping[str, nn.Module], hook: OutputHook
) -> Iterator[None]:
    """Register ``hook`` as a forward hook on each of ``modules`` (a name -> module mapping,
    e.g. from :func:`select_modules`) for the duration of the ``with`` block.

    The hook receives a per-call key (see :func:`call_key`); the call counters restart at
    every forward pass of ``model`` (a forward pre-hook on ``model``). All hooks are removed
    when the block exits, also on an exception.
    """
    counts: dict[str, int] = defaultdict(int)
    handles = []

    def reset(_module: nn.Module, _inputs: tuple) -> None:
        counts.clear()

    def make(name: str) -> Callable[[nn.Module, tuple, Any], Any]:
        def fn(module: nn.Module, inputs: tuple, output: Any) -> Any:
            index = counts[name]
            counts[name] += 1
            return hook(call_key(name, index), module, inputs, output)

        return fn

    try:
        handles.append(model.register_forward_pre_hook(reset))
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_outputs(
    model: nn.Module, layers: LayerSpec | None = None, *, detach: bool = True
) -> Iterator[dict[str, list[Any]]]:
    """Record the outputs of the selected modules during the ``with`` block.

    Yields a dict ``key -> list of outputs``, one entry appended per call; keys follow
    :func:`call_key` in the order the modules first run. Tensors are detached unless
    ``detach=False`` (they stay on their device: record few batches). The hooks are removed
    when the block exits, also on an exception.

    Example::

        with record_outputs(model, "features.*") as outs:
            model(images)
        outs["features.2"][0]  # (N, C, H, W)

    Raises:
        ValueError: if ``layers`` matches no module (see :func:`select_modules`).
    """
    modules = select_modules(model, layers)
    outputs: dict[str, list[Any]] = {}

    def hook(key: str, _module: nn.Module, _inputs: tuple, output: Any) -> None:
        if detach and isinstance(output, Tensor):
            output = output.detach()
        outputs.setdefault(key, []).append(output)

    with forward_hooks(model, modules, hook):
        yield outputs
