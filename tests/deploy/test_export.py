"""Export: every registered network through torch.export (unfused and fused, dynamic batch)
against its eager output; ONNX (fused) through ONNX Runtime for a subset covering every
architecture and layer kind; portability, grad modes, refusals and missing packages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch
from torch import nn

import cenet
from cenet.deploy import export as ex
from cenet.deploy import fuse
from cenet.layers import ChannelEquilibrium

SIZE = 32  # every registered network runs at 32x32
ALL_MODELS = [n for n in cenet.list_models() if not n.startswith("_")]  # not the tests' own
DEEPER = ("cifar_resnet56", "cifar_vgg16", "resnet34", "resnet101", "shufflenet_v2_x1_0")
MODELS = [n for n in ALL_MODELS if not n.startswith(DEEPER)]
"""Every network at the smallest depth/width of its architecture, with every block variant
registered for it (32 of 61). The deeper ones repeat the same blocks and cost 3 more minutes
(mostly torch.export's pass over the layers' autocast regions);
``experiments/export_all.py`` exports all 61 to .pt2 and ONNX."""
ONNX_MODELS = [  # every architecture and every layer kind: CE, BD, IR, SE, GCT, IterNorm, DBN
    "cifar_resnet20_ce", "cifar_vgg11_gct", "resnet18", "resnet18_ce", "resnet18_iternorm",
    "resnet18_dbn", "resnet18_se", "resnet18_ir", "resnet50_bd", "mobilenet_v2_ce",
    "shufflenet_v2_x0_5_ce",
]
PT2_TOL, ONNX_TOL = 1e-5, 1e-4
SLOW = {"resnet50_gct", "resnet50_dbn", "resnet50_iternorm", "resnet50_ce", "mobilenet_v2_ce",
        "shufflenet_v2_x0_5_ce"}  # more than about 5 s each


def _params(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]

needs_onnx = pytest.mark.skipif(
    not all(find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the ONNX packages: pip install 'cenet[export]'",
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


_KEPT: dict[str, tuple] = {}  # the ONNX subset's models and fused programs, built once


def _perturbed(name: str) -> nn.Module:
    """The network in eval with its parameters and buffers off their initial values."""
    torch.manual_seed(0)  # the weights too: the same network every run
    return ex.randomize_eval_state(cenet.create_model(name, num_classes=10))


def _prepared(name: str) -> tuple[nn.Module, nn.Module, torch.export.ExportedProgram]:
    """``(trained model, fused copy, fused program)``, kept for the ONNX subset."""
    if name in _KEPT:
        return _KEPT[name]
    model = _perturbed(name)
    fused = fuse(model)
    out = model, fused, ex.export_program(fused, image_size=SIZE)
    if name in ONNX_MODELS:
        _KEPT[name] = out
    return out


def _check_batches(eager: nn.Module, program: torch.export.ExportedProgram) -> None:
    run = program.module()
    for batch in (1, 3):
        x = ex.example_input(eager, SIZE, batch, seed=batch)
        with torch.no_grad():
            ref, out = eager(x), run(x)
        assert out.shape == (batch, 10)
        assert _rel(out, ref) <= PT2_TOL, (batch, _rel(out, ref))


def test_the_exported_subset_has_every_block_variant_of_every_architecture():
    def kind(name: str) -> tuple[str, str]:  # ("resnet", "gct"), ("shufflenet_v", "plain")
        tail = name.rsplit("_", 1)[-1]
        variant = tail if tail in ("ce", "bd", "ir", "se", "gct", "iternorm", "dbn") else "plain"
        return re.sub(r"\d.*", "", name), variant

    assert {kind(n) for n in ALL_MODELS} == {kind(n) for n in MODELS}


@pytest.mark.parametrize("name", _params(MODELS))
def test_every_model_exports_unfused_and_fused_with_a_dynamic_batch(name):
    model, fused, fused_program = _prepared(name)
    program = ex.export_program(model, image_size=SIZE)
    assert not ex.native_ops(program)  # portable: aten only
    _check_batches(model, program)
    assert not any("batch_norm" in op for op in ex.program_ops(fused_program))
    assert not ex.native_ops(fused_program)
    _check_batches(fused, fused_program)


@needs_onnx
@pytest.mark.parametrize("name", _params(ONNX_MODELS))
def test_fused_onnx_uses_standard_operators_and_matches_pytorch(name, tmp_path):
    model, _, program = _prepared(name)
    path = ex.export_onnx(program, tmp_path / f"{name}.onnx", metadata={"model": name})
    assert {domain for domain, _ in ex.onnx_ops(path)} == {""}
    session = ex.onnx_session(path)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape) == ("input", ["batch", 3, SIZE, SIZE])
    assert (out.name, out.shape) == ("logits", ["batch", 10])
    for batch in (1, 3):
        x = ex.example_input(model, SIZE, batch, seed=batch)
        assert ex.parity(model, session, x) <= ONNX_TOL


@needs_onnx
def test_export_onnx_from_a_module_names_its_onnx_needs_and_keeps_metadata(tmp_path):
    import onnx

    model = cenet.create_model("cifar_resnet20_ce")
    path = ex.export_onnx(model, tmp_path / "m.onnx", image_size=SIZE, dynamic_batch=False,
                          metadata={"model": "cifar_resnet20_ce"})
    proto = onnx.load(path)
    assert {p.key: p.value for p in proto.metadata_props} == {"model": "cifar_resnet20_ce"}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2  # static
    assert ex.parity(model, path, ex.example_input(model, SIZE, 2)) <= ONNX_TOL
    assert model.training  # put back in its mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left


@pytest.mark.slow
def test_portable_pt2_loads_and_runs_with_plain_torch(tmp_path):
    model = _perturbed("cifar_resnet20_ce")
    path = ex.save_program(ex.export_program(model, image_size=SIZE), tmp_path / "m.pt2",
                           metadata=json.dumps({"model": "cifar_resnet20_ce"}))
    x = ex.example_input(model, SIZE, 3)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch; ep = torch.export.load(sys.argv[1]); "
        "y = ep.module()(torch.load(sys.argv[2])); torch.save(y, sys.argv[3]); "
        "assert not [m for m in sys.modules if m.startswith('cenet')]"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, cwd=tmp_path)
    with torch.no_grad():
        assert _rel(torch.load(tmp_path / "y.pt"), model(x)) <= PT2_TOL
    extra = {ex.METADATA_FILE: ""}
    torch.export.load(path, extra_files=extra)
    assert json.loads(extra[ex.METADATA_FILE]) == {"model": "cifar_resnet20_ce"}
    assert ex.parity(model, path, x) <= PT2_TOL  # parity reads .pt2 files too


@pytest.mark.parametrize("portable", [True, False])
def test_program_runs_with_grad_enabled_and_under_no_grad(portable):
    model = _perturbed("cifar_resnet20_ce")
    program = ex.export_program(model, image_size=SIZE, portable=portable)
    # the native eval op where the kernels run (exported under no_grad), else aten only
    assert bool(ex.native_ops(program)) == (not portable and cenet.kernels.active_isa() is not None)
    x = ex.example_input(model, SIZE, 3)
    with torch.no_grad():
        ref = model(x)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            y = program.module()(x)
        assert _rel(y.detach(), ref) <= PT2_TOL


def test_export_refuses_batch_statistics_in_eval_and_non_finite_weights():
    bn_batch = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"1 normalize with the statistics of the batch"):
        ex.export_program(bn_batch, image_size=8)
    diverged = cenet.create_model("cifar_resnet20_ce")
    diverged.layer1[0].bn1.running_var[0] = float("nan")
    with pytest.raises(ValueError, match="layer1.0.bn1.running_var hold NaN or Inf"):
        ex.export_program(diverged, image_size=SIZE)
    with pytest.raises(TypeError, match="nn.Module"):
        ex.export_program(torch.zeros(1), image_size=SIZE)


def test_export_rejects_bad_sizes_and_untraceable_models():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ChannelEquilibrium(4, group_size=4))
    with pytest.raises(ValueError, match="batch_size must be >= 2 for a dynamic batch"):
        ex.export_program(model, image_size=8, batch_size=1)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        ex.export_program(model, image_size=0)
    ex.export_program(model, image_size=8, batch_size=1, dynamic_batch=False)

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent Python branch

    with pytest.raises(ValueError, match="torch.export could not export Branchy"):
        ex.export_program(Branchy(), image_size=8)


def test_onnx_needs_its_packages(monkeypatch, tmp_path):
    model = cenet.create_model("cifar_resnet20")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"'onnxscript'.*pip install 'cenet\[export\]'"):
        ex.export_onnx(model, tmp_path / "m.onnx", image_size=SIZE)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"'onnxruntime'.*cenet\[export\]"):
        ex.onnx_session(tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@needs_onnx
def test_onnx_export_refuses_custom_domains_and_native_programs(monkeypatch, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def custom_domain(program, path):
        node = helper.make_node("Gelu", ["input"], ["logits"], domain="com.microsoft")
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("input",
                                                                                 "logits")]
        graph = helper.make_graph([node], "g", [io[0]], [io[1]])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                          helper.make_opsetid("com.microsoft", 1)]),
                  path)

    model = cenet.create_model("cifar_resnet20")
    monkeypatch.setattr(ex, "_to_onnx", custom_domain)
    with pytest.raises(ValueError, match="outside the default domain: com.microsoft::Gelu"):
        ex.export_onnx(model, tmp_path / "m.onnx", image_size=SIZE)
    assert not list(tmp_path.iterdir())  # nothing written
    monkeypatch.undo()
    if cenet.kernels.active_isa() is not None:
        native = ex.export_program(cenet.create_model("cifar_resnet20_ce"), image_size=SIZE,
                                   portable=False)
        with pytest.raises(ValueError, match="portable=True"):
            ex.export_onnx(native, tmp_path / "n.onnx")
    with pytest.raises(ValueError, match="image_size is required"):
        ex.export_onnx(model, tmp_path / "m.onnx")


def test_outputs_that_cannot_be_written(tmp_path):
    program = ex.export_program(nn.Sequential(nn.Conv2d(3, 2, 1)), image_size=4)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot create its directory"):
        ex.save_program(program, tmp_path / "file" / "m.pt2")
    with pytest.raises(ValueError, match="is a directory"):
        ex.save_program(program, tmp_path)
    path = ex.save_program(program, tmp_path / "new" / "m.pt2")  # missing parents are created
    assert path.is_file()
    with pytest.raises(FileNotFoundError):
        ex.load_program(tmp_path / "absent.pt2")


def test_parity_of_modules_and_its_errors():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten())
    x = ex.example_input(model, 4, 2)
    assert ex.parity(model, model, x) == 0.0
    other = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten())
    with torch.no_grad():
        other[0].weight.copy_(model[0].weight * 1.01)
        other[0].bias.copy_(model[0].bias * 1.01)
    assert ex.parity(model, other, x) == pytest.approx(0.01 / 1.0, rel=1e-3)
    with pytest.raises(ValueError, match="output shapes differ"):
        ex.parity(model, nn.Sequential(nn.Conv2d(3, 1, 1), nn.Flatten()), x)
    with pytest.raises(TypeError, match="ExportedProgram"):
        ex.parity(model, 3, x)
    with pytest.raises(ValueError, match="expected .onnx or .pt2"):
        ex.parity(model, "model.bin", x)
