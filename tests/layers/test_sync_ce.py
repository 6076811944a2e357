"""SyncCE: two gloo processes on the CPU equal one process on the concatenated batch.

Each rank holds a slice of one float64 batch (unequal slices, and a rank with no sample).
Outputs, input gradients, parameter gradients summed over the ranks and the running buffers
must equal a single unsynchronized layer trained on the whole batch, to 1e-8.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cenet
from cenet.layers import (
    BatchDecorrelation,
    ChannelEquilibrium,
    InstanceReweighting,
    SyncBatchDecorrelation,
    SyncChannelEquilibrium,
    SyncInstanceReweighting,
)

TOL = {"rtol": 1e-8, "atol": 1e-8}
WORLD = 2

# (layer kind, mode, pool, per-rank batch sizes, channels_last)
CASES = [
    ("ce", "ce", False, (3, 5), False),
    ("ce", "ce", True, (4, 2), False),
    ("ce", "bd", False, (3, 5), True),
    ("ce", "bd", True, (2, 6), False),
    ("ce", "ir", False, (5, 3), False),
    ("ce", "ce", False, (6, 0), False),  # rank 1 has an empty batch
    ("ce", "ce", True, (0, 4), True),  # rank 0 has an empty batch
    ("bd", None, False, (3, 5), False),
    ("bd", None, True, (4, 2), True),
    ("ir", None, False, (3, 5), False),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer(kind: str, mode: str | None, pool: bool) -> torch.nn.Module:
    c, opts = 32, {"dtype": torch.float64}
    if kind == "ce":
        layer = ChannelEquilibrium(c, mode=mode, group_size=8, pool=pool, **opts)
    elif kind == "bd":
        layer = BatchDecorrelation(c, group_size=8, pool=pool, **opts)
    else:
        layer = InstanceReweighting(c, **opts)
    with torch.no_grad():  # away from the initial values, so every gradient is exercised
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _step(layer, x, grad_out):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    (y * grad_out).sum().backward()
    return y.detach(), x.grad


def _check_case(rank: int, case) -> None:
    kind, mode, pool, sizes, channels_last = case
    torch.manual_seed(1234)
    ref = _layer(kind, mode, pool)
    sync = cenet.convert_sync_ce(copy.deepcopy(ref))
    assert type(sync).__name__.startswith("Sync")
    total, offset = sum(sizes), sum(sizes[:rank])
    for _ in range(2):  # two steps: the running buffers blend twice
        x = torch.randn(total, 32, 6, 6, dtype=torch.float64) * 2 + 0.5
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x)
        y_ref, gx_ref = _step(ref, x, g)
        part = slice(offset, offset + sizes[rank])
        y, gx = _step(sync, x[part], g[part])
        torch.testing.assert_close(y, y_ref[part], **TOL)
        torch.testing.assert_close(gx, gx_ref[part], **TOL)
        for (name, p_ref), p in zip(ref.named_parameters(), sync.parameters(), strict=True):
            grad = p.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, p_ref.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
        for (name, b_ref), b in zip(ref.named_buffers(), sync.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref, **TOL, msg=lambda m, n=name: f"{n}: {m}")
        ref.zero_grad()
        sync.zero_grad()
    # eval: no communication, the same running buffers give the same outputs
    ref.eval()
    sync.eval()
    x = torch.randn(3, 32, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sync(x), ref(x), **TOL)


def _check_compiled(rank: int) -> None:
    """Under torch.compile (fullgraph) the functional all-reduce traces; same numbers."""
    torch.manual_seed(99)
    eager = cenet.convert_sync_ce(_layer("ce", "ce", False))
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3 + rank, 32, 6, 6, dtype=torch.float64)
    g = torch.randn_like(x)
    y_e, gx_e = _step(eager, x, g)
    y_c, gx_c = _step(compiled, x, g)
    torch.testing.assert_close(y_c, y_e, **TOL)
    torch.testing.assert_close(gx_c, gx_e, **TOL)
    torch.testing.assert_close(compiled_layer.bd.running_wm, eager.bd.running_wm, **TOL)


def _worker(rank: int, port: int, cases, compiled: bool) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for case in cases:
            try:
                _check_case(rank, case)
            except AssertionError as err:
                raise AssertionError(f"rank {rank}, case {case}: {err}") from None
        if compiled:
            _check_compiled(rank)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_whole_batch():
    mp.spawn(_worker, args=(_free_port(), CASES, False), nprocs=WORLD, join=True)


def test_compiled_sync_ce_traces_the_functional_all_reduce():
    mp.spawn(_worker, args=(_free_port(), [], True), nprocs=WORLD, join=True)


def test_without_a_process_group_sync_layers_equal_their_bases():
    torch.manual_seed(0)
    for kind, mode, pool, *_ in CASES[:5] + CASES[7:]:
        ref = _layer(kind, mode, pool).float()
        sync = cenet.convert_sync_ce(copy.deepcopy(ref))
        x = torch.randn(4, 32, 6, 6)
        g = torch.randn_like(x)
        y_ref, gx_ref = _step(ref, x, g)
        y, gx = _step(sync, x, g)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(gx, gx_ref)


def test_convert_keeps_names_shares_tensors_and_reverts():
    model = cenet.create_model("resnet18_ce", num_classes=10)
    ce_count = sum(isinstance(m, ChannelEquilibrium) for m in model.modules())
    params_before = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    synced = cenet.convert_sync_ce(model)
    assert sum(isinstance(m, SyncChannelEquilibrium) for m in synced.modules()) == ce_count > 0
    # the CE blocks' own BD/IR parts stay plain: the block reduces their statistics once
    assert not any(isinstance(m, SyncBatchDecorrelation | SyncInstanceReweighting)
                   for m in synced.modules())
    for name, p in synced.named_parameters():
        assert p is params_before[name]
    assert list(synced.state_dict()) == list(state)
    synced.load_state_dict(state)
    reverted = cenet.revert_sync_ce(synced)
    assert not any(isinstance(m, SyncChannelEquilibrium) for m in reverted.modules())
    assert sum(type(m) is ChannelEquilibrium for m in reverted.modules()) == ce_count
    reverted.load_state_dict(state)


def test_convert_a_single_layer_returns_a_new_module_sharing_buffers():
    bd = BatchDecorrelation(16, group_size=4)
    sync = cenet.convert_sync_ce(bd)
    assert type(sync) is SyncBatchDecorrelation and sync is not bd
    assert sync.running_wm is bd.running_wm
    sync.register_buffer("extra", torch.zeros(1))  # containers are not shared
    assert "extra" not in dict(bd.named_buffers())
    ir = cenet.revert_sync_ce(cenet.convert_sync_ce(InstanceReweighting(16)))
    assert type(ir) is InstanceReweighting and not hasattr(ir, "process_group")


def test_convert_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        cenet.convert_sync_ce(torch.zeros(1))
