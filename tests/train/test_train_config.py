"""TrainConfig: YAML + overrides precedence, unknown keys, coercion, validation, bundled files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cenet.train import (
    SCHEDULES,
    TrainConfig,
    bundled_configs,
    config_from_dict,
    load_config,
    parse_overrides,
    read_yaml_config,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_then_overrides_precedence(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "c.yaml", "epochs: 7\nlr: 0.3\nbatch_size: 64\nschedule: step\n")
    cfg = load_config(cfg_file, {"lr": 0.05, "seed": 3})
    assert cfg.epochs == 7  # from YAML
    assert cfg.batch_size == 64  # from YAML
    assert cfg.lr == 0.05  # override wins over YAML
    assert cfg.seed == 3  # override of a default
    assert cfg.momentum == 0.9  # default
    assert cfg.schedule == "step"


def test_cli_precedence_yaml_set_flags(tmp_path: Path) -> None:
    from cenet.cli.main import build_parser
    from cenet.cli.train import _given

    cfg_file = write(tmp_path / "c.yaml", "epochs: 7\nlr: 0.3\nseed: 1\n")
    args = build_parser().parse_args(
        ["train", "--config", str(cfg_file), "--set", "lr=0.2", "--set", "seed=5", "--lr", "0.01"]
    )
    cfg = config_from_dict(_given(args))
    assert (cfg.epochs, cfg.lr, cfg.seed) == (7, 0.01, 5)


def test_unknown_yaml_key_lists_close_matches_and_valid_keys(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "c.yaml", "epochs: 3\nweight_decy: 0.1\n")
    with pytest.raises(ValueError, match="'weight_decy'") as info:
        read_yaml_config(cfg_file)
    msg = str(info.value)
    assert "did you mean 'weight_decay'" in msg
    assert "valid keys:" in msg and "label_smoothing" in msg


def test_unknown_set_key() -> None:
    with pytest.raises(ValueError, match="did you mean 'milestones'"):
        parse_overrides(["milestone=[1,2]"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"])


def test_set_values_are_yaml() -> None:
    got = parse_overrides(
        ["milestones=[60, 120]", "model_kwargs={width: 0.5}", "data=null", "nesterov=true"]
    )
    assert got == {
        "milestones": [60, 120],
        "model_kwargs": {"width": 0.5},
        "data": None,
        "nesterov": True,
    }
    cfg = config_from_dict(got)
    assert cfg.milestones == [60.0, 120.0] and cfg.model_kwargs == {"width": 0.5}


def test_yaml_scientific_notation_is_a_number(tmp_path: Path) -> None:
    # PyYAML reads 5e-4 (no dot) as a string; the config converts it
    cfg = load_config(write(tmp_path / "c.yaml", "weight_decay: 5e-4\nlr: 1e-1\n"))
    assert cfg.weight_decay == 5e-4 and cfg.lr == 0.1


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("epochs", 0, "epochs=0"),
        ("lr", -0.1, "lr=-0.1"),
        ("schedule", "linear", str(SCHEDULES)),
        ("momentum", 1.5, "[0, 1)"),
        ("warmup_epochs", 10, "warmup_epochs=10"),
        ("label_smoothing", 1.0, "label_smoothing"),
        ("device", "gpu", "'cpu', 'cuda' or 'cuda:N'"),
        ("batch_size", "many", "must be an integer"),
        ("nesterov", "yes", "true or false"),
        ("milestones", [120, 60], "increasing"),
    ],
)
def test_invalid_values_name_key_value_and_valid(key: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        config_from_dict({key: value})
    assert key in str(info.value)
    assert needle in str(info.value)


def test_image_size_is_32_or_none_for_cifar10_and_any_positive_size_for_folders() -> None:
    assert config_from_dict({"image_size": 32}).image_size == 32
    assert config_from_dict({"dataset": "folder", "image_size": 224}).image_size == 224
    with pytest.raises(ValueError, match=r"invalid image_size=64: must be null or 32 with "
                       r"dataset=cifar10"):
        config_from_dict({"image_size": 64})
    with pytest.raises(ValueError, match=r"invalid image_size=0: must be an integer > 0"):
        config_from_dict({"dataset": "folder", "image_size": 0})


def test_bundled_configs_load() -> None:
    assert {"main", "cifar10_vgg16_paper", "cifar10_vgg16_bn_paper"} <= set(bundled_configs())
    paper = load_config("cifar10_vgg16_paper")
    assert (paper.model, paper.epochs, paper.batch_size, paper.lr) == (
        "cifar_vgg16_ce",
        160,
        256,
        0.1,
    )
    assert (paper.schedule, paper.step_size, paper.gamma) == ("step", 60, 0.1)
    assert (paper.momentum, paper.weight_decay) == (0.9, 5e-4)
    bn = load_config("cifar10_vgg16_bn_paper")
    assert bn.model == "cifar_vgg16"
    assert {k: v for k, v in bn.to_dict().items() if k not in ("model", "out")} == {
        k: v for k, v in paper.to_dict().items() if k not in ("model", "out")
    }
    main = load_config("main.yaml")
    assert main.data is None and main.model == "cifar_vgg11_ce" and main.no_wd_1d
    assert (main.epochs, main.channels_last, main.model_kwargs) == (9, True, {"width": 0.5})


def test_missing_config_names_bundled_ones() -> None:
    with pytest.raises(FileNotFoundError, match="bundled configs: .*main"):
        load_config("no_such_config")


def test_replace_and_round_trip() -> None:
    cfg = TrainConfig(epochs=3)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(lr=0.5).lr == 0.5
    with pytest.raises(ValueError, match="unknown config key"):
        cfg.replace(learning_rate=0.5)
