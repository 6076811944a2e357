"""The ``cenet`` command's entry points: ``python -m cenet``, ``--version``, ``cenet info``."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import pytest
import torch

import cenet
import cenet.kernels
from cenet.cli.info import format_report, format_value
from cenet.cli.main import main

FAKE_INFO = {
    "torch version": "2.14.1",
    "cenet version": "0.1.0",
    "CPU model": "Intel(R) Xeon(R) CPU @ 2.20GHz",
    "CPU capability": "AVX2",
    "supported ISAs": ["avx2", "avx512"],
    "active ISA": "avx2",
    "kernels active": True,
    "build error": None,
    "threads": 2,
    "CUDA devices": [],
}

EXPECTED_LINES = [
    "torch version: 2.14.1",
    "cenet version: 0.1.0",
    "CPU model: Intel(R) Xeon(R) CPU @ 2.20GHz",
    "CPU capability: AVX2",
    "supported ISAs: avx2, avx512",
    "active ISA: avx2",
    "kernels active: yes",
    "build error: none",
    "threads: 2",
    "CUDA devices: none",
]


def test_version_is_the_installed_distributions(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"cenet {metadata.version('cenet')}\n"
    assert cenet.__version__ == metadata.version("cenet")


def test_python_dash_m_cenet_runs_the_command(cli_env) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cenet", "--version"],
        env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"cenet {metadata.version('cenet')}\n"
    proc = subprocess.run(
        [sys.executable, "-m", "cenet", "models", "resnet50_c*"],
        env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == cenet.list_models("resnet50_c*") == ["resnet50_ce"]
    proc = subprocess.run(
        [sys.executable, "-m", "cenet", "no-such-command"],
        env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "invalid choice: 'no-such-command'" in proc.stderr


def test_info_prints_one_line_per_entry_in_order(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cenet.kernels, "info", lambda: dict(FAKE_INFO), raising=False)
    assert main(["info"]) == 0
    assert capsys.readouterr().out.splitlines() == EXPECTED_LINES


def test_info_json_is_the_report(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cenet.kernels, "info", lambda: dict(FAKE_INFO), raising=False)
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == FAKE_INFO


def test_format_value() -> None:
    assert format_value(False) == "no"
    assert format_value(0) == "0"
    assert format_value(()) == "none"
    assert format_value({"cuda:0": "A100", "cuda:1": None}) == "cuda:0=A100, cuda:1=none"
    assert format_value(["sm_80", 8]) == "sm_80, 8"
    assert format_report({"a": 1, "b": "x y"}) == ["a: 1", "b: x y"]


def test_info_reports_the_real_kernels_module(capsys) -> None:
    """The real ``cenet.kernels.info()``: one line per entry, the torch version among them."""
    report = cenet.kernels.info()
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [str(k) for k in report]
    assert any(torch.__version__ in line for line in lines)
    assert any(cenet.__version__ in line for line in lines)


def test_help_lists_info_and_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--version" in text and "print the installed cenet version" in text
    assert "info" in text and "show versions, CPU, kernel ISA and threads" in text
