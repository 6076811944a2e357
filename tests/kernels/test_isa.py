"""The native CPU kernels per instruction set (cenet.kernels): the sources compile for every
x86-64 level (and aarch64 where a cross compiler is installed), the builds load, every ISA this
CPU runs agrees with the generic build and with a float64 computation in plain PyTorch (CE
paper, Eqns 4-8, 21), the ISA selection (CENET_CPU_ISA, use_isa), and a failing build (the
compiler's error, the warning, the marker that stops retries)."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from cenet import kernels
from cenet.kernels import _build

COMPILER = _build.find_compiler()
X86 = _build.arch() == "x86_64"
ARM_CXX = "aarch64-linux-gnu-g++"


def _compile_sources(cxx: str, march: str, tmp_path) -> None:
    """block_ops.cpp (all the code that depends on the ISA: vector widths, intrinsics, register
    constraints, which only code generation checks) compiled to an object, the other two
    sources checked, concurrently; the flags are those of cenet.kernels' builds."""
    from torch.utils import cpp_extension

    flags = ["-std=c++20", "-fPIC", "-O3", f"-march={march}", "-fno-math-errno", "-fopenmp",
             "-DCENET_NS=cenet_kernels_test",
             *(f"-isystem{p}" for p in cpp_extension.include_paths())]
    block_ops, *others = (str(p) for p in _build.SOURCES)
    commands = [[cxx, *flags, "-c", block_ops, "-o", str(tmp_path / "block_ops.o")],
                [cxx, *flags, "-fsyntax-only", *others]]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(
            lambda cmd: subprocess.run(cmd, capture_output=True, text=True, check=False),
            commands))
    for cmd, res in zip(commands, results, strict=True):
        assert res.returncode == 0, f"{' '.join(cmd[:6])} ... failed:\n{res.stderr[-4000:]}"
    assert (tmp_path / "block_ops.o").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(not X86, reason="x86-64 targets are compiled on x86-64 machines")
@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "x86-64-v4"])
def test_sources_compile_for_each_x86_level(march, tmp_path):
    _compile_sources(COMPILER, march, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not X86 or shutil.which(ARM_CXX) is None,
                    reason=f"needs {ARM_CXX} on an x86-64 machine")
def test_sources_cross_compile_for_aarch64(tmp_path):
    _compile_sources(ARM_CXX, "armv8-a", tmp_path)


@pytest.fixture
def default_env(monkeypatch):
    """The kernels on, no ISA forced by the environment or use_isa."""
    for name in ("CENET_KERNELS", "CENET_CPU_ISA", "CENET_KERNELS_REBUILD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kernels, "_forced", kernels._UNSET)


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler: the reference path is expected")
def test_kernels_build_and_load_where_a_compiler_is_found(default_env):
    available = kernels.is_available()
    assert available, f"the build failed:\n{kernels.build_error()}"
    assert kernels.build_error() is None
    assert kernels.active_isa() == kernels.default_isa() == kernels.supported_isas()[0]
    ops = kernels.ops()
    assert ops is getattr(torch.ops, f"cenet_kernels_{kernels.active_isa()}")
    for name in ("ce_step", "ce_step_backward", "ce_eval", "ce_eval_nhwc", "stream_threshold"):
        assert hasattr(ops, name)
    report = kernels.info()
    assert report["kernels_active"] and report["active_isa"] == kernels.active_isa()
    assert report["build_error"] is None and report["kernels_note"] is None
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_supported_isas_follow_the_cpu_capability():
    isas, cap = kernels.supported_isas(), kernels.cpu_capability()
    assert isas[-1] == "generic"
    if X86:
        assert ("avx512" in isas) <= (cap == "AVX512")
        assert ("avx2" in isas) <= (cap in ("AVX512", "AVX2"))
        order = ("avx512", "avx2", "generic")
        assert list(isas) == sorted(isas, key=order.index)


# --- numerics: every ISA against the generic build and a float64 computation ---------------

EPS_BD, EPS_IR, LN_EPS, ITERS = 1e-5, 1e-5, 1e-5, 5
# (N, C, H, W, g): vector tails (30, 49 positions), two chunks of positions (561), group sizes
# 4 to 64; N·H·W well above g (a well-conditioned covariance)
SHAPES = [(4, 32, 6, 5, 8), (6, 64, 7, 7, 16), (3, 64, 33, 17, 16), (5, 64, 5, 4, 32),
          (9, 128, 4, 4, 64), (5, 12, 7, 7, 4)]


def make_inputs(shape, dtype, seed=0):
    n, c, h, w, g = shape
    gen = torch.Generator().manual_seed(seed)
    hd = max(c // 16, 4)
    mix = torch.eye(c, dtype=torch.float64) + 0.3 * torch.randn(c, c, generator=gen,
                                                                 dtype=torch.float64)
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(n, c, h, w, generator=gen,
                                                       dtype=torch.float64)) * 1.7 + 0.4
    params = {
        "theta": torch.tensor([0.3], dtype=torch.float64),
        "fc1": torch.randn(hd, c, generator=gen, dtype=torch.float64) / c**0.5,
        "ln_w": torch.rand(hd, generator=gen, dtype=torch.float64) + 0.5,
        "ln_b": torch.rand(hd, generator=gen, dtype=torch.float64) * 0.4 - 0.2,
        "fc2": torch.randn(c, hd, generator=gen, dtype=torch.float64) / hd**0.5,
    }
    return x.to(dtype).contiguous(), {k: v.to(dtype) for k, v in params.items()}


def reference_gate(var, p):
    """d = sigmoid(fc2 ReLU(LN(fc1 var))) (Eqns 8, 21), var (N, C)."""
    h = F.layer_norm(var @ p["fc1"].t(), (p["fc1"].shape[0],), p["ln_w"], p["ln_b"], LN_EPS)
    return torch.sigmoid(torch.relu(h) @ p["fc2"].t())


def reference_step(x, p, g):
    """ce_step's Y with batch statistics (ce_operator.cpp): Σ = E[x xᵀ] - μμᵀ + ε I per group,
    W = P_T of the Newton iteration on Σ / tr Σ; d = gate(σ²) (s + ε)^-1/2 with σ² the
    population variances and s their mean; Y_n = (λW + (1 - λ) Diag(d_n)) x_n."""
    n, c, h, w = x.shape
    groups, m = c // g, h * w
    xb = x.reshape(n, groups, g, m)
    mean = xb.mean(3)  # (N, G, g)
    second = torch.einsum("ngim,ngjm->gij", xb, xb) / (n * m)
    mu = mean.mean(0)
    eye = torch.eye(g, dtype=x.dtype)
    sigma = second - mu.unsqueeze(2) * mu.unsqueeze(1) + EPS_BD * eye
    sn = sigma / sigma.diagonal(dim1=1, dim2=2).sum(1).view(groups, 1, 1)
    wm = 1.5 * eye - 0.5 * sn
    for _ in range(ITERS - 1):
        wm = 1.5 * wm - 0.5 * wm @ wm @ wm @ sn
    var = torch.clamp((xb * xb).mean(3) - mean * mean, min=0).reshape(n, c)
    inv_std = (var.mean() + EPS_IR).rsqrt()
    d = reference_gate(var, p) * inv_std
    lam = torch.sigmoid(p["theta"])
    y = torch.einsum("gij,ngjm->ngim", lam * wm, xb) + ((1 - lam) * d).view(n, groups, g, 1) * xb
    return y.reshape(n, c, h, w), wm, inv_std.reshape(1)


def reference_eval(x, wm, p, scale, g):
    """ce_eval: y_n = (W + Diag(scale · gate(σ²_n))) x_n, σ²_n the population variances."""
    n, c, h, w = x.shape
    xb = x.reshape(n, c // g, g, h * w)
    var = xb.var(3, unbiased=False).reshape(n, c)
    d = scale * reference_gate(var, p)
    y = torch.einsum("gij,ngjm->ngim", wm, xb) + d.view(n, c // g, g, 1) * xb
    return y.reshape(n, c, h, w)


def run_isa(isa, x, p, g, grad, scale, wm_eval):
    """ce_step's Y, W, inv_std, finite; ce_step_backward's gradients; ce_eval with and without W
    (IR only); of one ISA's build."""
    ops = kernels.ops(isa)
    n, c, h, w = x.shape
    out = ops.ce_step(x, g, p["theta"], p["fc1"], p["ln_w"], p["ln_b"], p["fc2"], EPS_BD, EPS_IR,
                      LN_EPS, ITERS)
    assert len(out) == 18
    y, saved = out[0], out[1:]
    grads = ops.ce_step_backward(grad, x, p["fc1"], p["ln_w"], p["fc2"], saved)
    evals = []
    for wm in (wm_eval, x.new_empty(0)):
        res = torch.empty_like(x)
        ops.ce_eval(x.reshape(n, c, h * w), wm, p["fc1"], p["ln_w"], p["ln_b"], LN_EPS, p["fc2"],
                    scale, g, res)
        evals.append(res)
    return {"y": y, "wm": saved[3], "inv_std": saved[4], "finite": saved[5], "grads": list(grads),
            "eval": evals[0], "eval_ir": evals[1]}


TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-9}, torch.float32: {"rtol": 2e-4, "atol": 2e-4}}
# gradients of float32 through the Newton iteration: a few more ulps
GRAD_TOL = {torch.float64: {"rtol": 1e-8, "atol": 1e-8},
            torch.float32: {"rtol": 2e-3, "atol": 2e-3}}


def reference_results(x, p, g, grad, scale, wm_eval):
    """The float64 reference of run_isa's results (the gradients by autograd)."""
    x64 = x.double().requires_grad_()
    p64 = {k: v.double().requires_grad_() for k, v in p.items()}
    y, wm, inv_std = reference_step(x64, p64, g)
    names = ("theta", "fc1", "ln_w", "ln_b", "fc2")
    grads = torch.autograd.grad(y, [x64, *(p64[k] for k in names)], grad.double())
    with torch.no_grad():
        p_plain = {k: v.detach() for k, v in p64.items()}
        ev = reference_eval(x64.detach(), wm_eval.double(), p_plain, scale.double(), g)
        ev_ir = reference_eval(x64.detach(), torch.zeros_like(wm_eval, dtype=torch.float64),
                               p_plain, scale.double(), g)
    return {"y": y.detach(), "wm": wm.detach(), "inv_std": inv_std.detach(),
            "grads": [t.detach() for t in grads], "eval": ev, "eval_ir": ev_ir}


def assert_results_close(got, want, dtype, what):
    for key in ("y", "wm", "inv_std", "eval", "eval_ir"):
        torch.testing.assert_close(got[key].double(), want[key].double(), **TOL[dtype],
                                   msg=lambda m, key=key: f"{what}, {key}: {m}")
    for i, (a, b) in enumerate(zip(got["grads"], want["grads"], strict=True)):
        torch.testing.assert_close(a.double(), b.double(), **GRAD_TOL[dtype],
                                   msg=lambda m, i=i: f"{what}, gradient {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("isa", kernels.supported_isas())
def test_every_isa_matches_generic_and_a_float64_reference(isa, dtype, default_env):
    assert kernels.is_available(isa), kernels.build_error(isa)
    assert kernels.is_available("generic"), kernels.build_error("generic")
    for shape in SHAPES:
        n, c, h, w, g = shape
        x, p = make_inputs(shape, dtype)
        gen = torch.Generator().manual_seed(1)
        grad = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
        wm_eval = (torch.eye(g, dtype=torch.float64) + 0.2 * torch.randn(
            c // g, g, g, generator=gen, dtype=torch.float64)).to(dtype)
        scale = torch.tensor([0.8], dtype=dtype)
        got = run_isa(isa, x, p, g, grad, scale, wm_eval)
        assert got["y"].shape == x.shape and got["y"].dtype == dtype
        assert bool(got["finite"])
        assert len(got["grads"]) == 6 and got["grads"][0].shape == x.shape
        assert_results_close(got, reference_results(x, p, g, grad, scale, wm_eval), dtype,
                             f"{isa} {shape} vs float64 reference")
        if isa != "generic":
            generic = run_isa("generic", x, p, g, grad, scale, wm_eval)
            assert_results_close(got, generic, dtype, f"{isa} {shape} vs generic")


def test_ce_eval_takes_the_scale_as_a_one_element_tensor(default_env):
    ops = kernels.ops()
    x, p = make_inputs((2, 16, 3, 3, 8), torch.float32)
    out = torch.empty_like(x)
    args = (x.reshape(2, 16, 9), x.new_empty(0), p["fc1"], p["ln_w"], p["ln_b"], LN_EPS,
            p["fc2"])
    with pytest.raises(RuntimeError, match="one-element scale"):
        ops.ce_eval(*args, torch.ones(2), 8, out)
    with pytest.raises((RuntimeError, TypeError)):
        ops.ce_eval(*args, 0.5, 8, out)  # a float is no longer accepted
    ops.ce_eval(*args, torch.tensor([0.5]), 8, out)
    assert torch.isfinite(out).all()


def test_stream_threshold_reads_and_sets_the_active_isas(default_env):
    before = kernels.stream_threshold()
    assert before >= 12 << 20
    try:
        assert kernels.stream_threshold(0) == before
        assert kernels.stream_threshold() == 0
    finally:
        kernels.stream_threshold(before)
    with pytest.raises(ValueError, match=">= 0"):
        kernels.stream_threshold(-1)


# --- choosing the ISA ----------------------------------------------------------------------

def test_cenet_cpu_isa_picks_a_supported_isa(default_env, monkeypatch):
    monkeypatch.setenv("CENET_CPU_ISA", " Generic ")
    assert kernels.default_isa() == "generic"
    assert kernels.active_isa() == "generic"
    assert kernels.ops() is torch.ops.cenet_kernels_generic


def test_cenet_cpu_isa_rejects_unknown_names(default_env, monkeypatch):
    monkeypatch.setenv("CENET_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match=r"unknown instruction set 'sse9'.*generic"):
        kernels.default_isa()
    with pytest.raises(ValueError, match="sse9"):
        kernels.active_isa()
    report = kernels.info()  # never raises: says why instead
    assert report["active_isa"] is None and "sse9" in report["kernels_note"]


@pytest.mark.skipif(not X86, reason="one ISA only on this architecture")
def test_cenet_cpu_isa_rejects_isas_the_cpu_does_not_run(default_env, monkeypatch):
    monkeypatch.setattr(kernels, "supported_isas", lambda: ("generic",))
    monkeypatch.setenv("CENET_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match=r"does not run 'avx512'; it supports generic"):
        kernels.default_isa()
    with pytest.raises(ValueError, match="does not run"):
        with kernels.use_isa("avx2"):
            pass
    assert not kernels.is_available("avx512")


def test_use_isa_none_turns_the_kernels_off_inside(default_env):
    assert kernels.is_available()
    active = kernels.active_isa()
    with kernels.use_isa(None):
        assert not kernels.is_available()
        assert kernels.active_isa() is None
        with pytest.raises(RuntimeError, match=r"use_isa\(None\)"):
            kernels.ops()
        assert kernels.is_available("generic")  # a named ISA is still there
        with kernels.use_isa("generic"):  # blocks nest
            assert kernels.active_isa() == "generic"
        assert kernels.active_isa() is None
    assert kernels.active_isa() == active and kernels.is_available()


def test_cenet_kernels_0_turns_everything_off(default_env, monkeypatch):
    monkeypatch.setenv("CENET_KERNELS", "0")
    assert not kernels.is_available() and not kernels.is_available("generic")
    assert kernels.active_isa() is None and kernels.build_error() is None
    with pytest.raises(RuntimeError, match="CENET_KERNELS=0"):
        kernels.ops("generic")
    with pytest.raises(ValueError, match="unknown"):
        kernels.use_isa("bogus").__enter__()


# --- a failing build -----------------------------------------------------------------------

@pytest.fixture
def broken_build(monkeypatch, tmp_path):
    """_build compiles a source with an error into an extension of its own in tmp_path."""
    source = tmp_path / "broken.cpp"
    source.write_text('#include <cstdio>\nint f() { return undeclared_name_in_cenet_test; }\n')
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("CENET_KERNELS_REBUILD", raising=False)
    monkeypatch.setattr(_build, "SOURCES", (source,))
    monkeypatch.setattr(_build, "extension_name", lambda isa: f"cenet_kernels_test_{isa}")
    return source


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
def test_a_failed_build_warns_with_the_compiler_error_and_is_not_retried(broken_build,
                                                                         monkeypatch):
    with pytest.warns(RuntimeWarning, match="could not be built") as record:
        cause = _build.build("generic")
    assert "undeclared_name_in_cenet_test" in cause and "error" in cause
    assert "ninja: build stopped" not in cause and "FAILED:" not in cause
    assert len(cause.splitlines()) <= _build.ERROR_LINES
    message = str(record[0].message)
    assert "undeclared_name_in_cenet_test" in message and "pure-PyTorch" in message
    markers = list(_build.build_directory("generic").glob("cenet_build_failed-*.txt"))
    assert len(markers) == 1

    def no_build(*args, **kwargs):
        raise AssertionError("the build ran again")

    monkeypatch.setattr(_build, "_compile_and_load", no_build)
    with pytest.warns(RuntimeWarning, match="failed to build in an earlier run"):
        assert _build.build("generic") == cause  # from the marker
    broken_build.write_text(broken_build.read_text() + "// changed\n")
    with pytest.raises(AssertionError, match="ran again"):
        _build.build("generic")  # the sources changed: a new key
    broken_build.write_text(broken_build.read_text().replace("// changed\n", ""))
    monkeypatch.setenv("CENET_KERNELS_REBUILD", "1")
    with pytest.raises(AssertionError, match="ran again"):
        _build.build("generic")  # forced


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
def test_the_public_api_reports_a_failed_build(broken_build, default_env, monkeypatch):
    monkeypatch.setattr(kernels, "_results", {})
    monkeypatch.setenv("CENET_CPU_ISA", "generic")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert not kernels.is_available()
        assert kernels.active_isa() is None
        assert "undeclared_name_in_cenet_test" in kernels.build_error()
        with pytest.raises(RuntimeError, match="build for generic failed"):
            kernels.ops()
        report = kernels.info()
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert not report["kernels_active"] and "undeclared" in report["build_error"]


def test_a_missing_compiler_is_named(broken_build, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler found \(looked for \$CXX, c\+\+, "
                                            r"g\+\+\)"):
        assert _build.build("generic") == _build.NO_COMPILER
    assert os.environ["CXX"] == "/nonexistent/c++"
