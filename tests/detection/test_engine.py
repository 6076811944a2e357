"""Detection training and evaluation: the config, the schedule, training iterations that lower
the loss, COCO evaluation (exact on an oracle), checkpoints, and resume after a stop or a kill
giving the same weights as an uninterrupted run.

All on the session's synthetic COCO set (8 train / 4 val images of 64 px), ResNet-18 detectors
with small RPN/ROI budgets and one torch thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from cenet.detection import NORM_SETTINGS, create_detector
from cenet.detection.batches import TrainBatches
from cenet.detection.checks import check_norm_setting
from cenet.detection.config import (
    LR_REFERENCE_BATCH,
    RESUME_MUTABLE,
    DetectConfig,
    bundled_detect_configs,
    load_detect_config,
    parse_detect_overrides,
    resume_detect_config,
    scaled_lr,
)
from cenet.detection.data import detection_loader, load_coco
from cenet.detection.engine import (
    build_lr_scheduler,
    evaluate,
    iou_types_of,
    train_one_epoch,
    train_step,
)
from cenet.detection.evaluate import load_detector
from cenet.detection.session import DetectRun, resume_detector, train_detector
from cenet.train import distributed
from cenet.train.checkpoint import load_checkpoint

SMALL = {
    "min_size": 64,
    "max_size": 64,
    "detector_kwargs": {
        "box_batch_size_per_image": 64,
        "rpn_pre_nms_top_n_train": 200,
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 100,
        "rpn_post_nms_top_n_test": 50,
        "box_detections_per_img": 20,
    },
}
"""Detector settings that make a ResNet-18 detector step in ~0.4 s (Faster) / ~0.7 s (Mask) at
64 px on one thread."""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_detector(name: str, **kwargs) -> nn.Module:
    return create_detector(
        name, num_classes=4, min_size=64, max_size=64, **SMALL["detector_kwargs"], **kwargs
    )


def run_config(data: Path, out: Path, **changes) -> DetectConfig:
    values = dict(
        model="fasterrcnn_resnet18_fpn_ce", data=str(data), out=str(out), epochs=2,
        batch_size=2, lr=0.08, warmup_iters=2, milestones=[1], workers=0, threads=1,
        progress=False, checkpoint_every=0, **SMALL,
    )  # fmt: skip
    values.update(changes)
    return load_detect_config(None, values)


# ----------------------------------------------------------------------------- config


def test_bundled_configs_hold_the_papers_schedule() -> None:
    names = bundled_detect_configs()
    assert names == [
        "coco_maskrcnn_r101_fpn_ce",
        "coco_maskrcnn_r50_fpn",
        "coco_maskrcnn_r50_fpn_ce",
        "coco_maskrcnn_r50_fpn_ce_sync",
    ]
    for name in names:
        cfg = load_detect_config(name)
        assert (cfg.epochs, cfg.lr, cfg.milestones, cfg.gamma) == (24, 0.02, (16, 22), 0.1)
        assert (cfg.momentum, cfg.weight_decay, cfg.batch_size) == (0.9, 1e-4, 2)
        assert (cfg.warmup_iters, cfg.warmup_factor) == (500, 0.001)
        assert (cfg.min_size, cfg.max_size, cfg.amp) == (800, 1333, None)
        assert cfg.norm == ("sync" if name.endswith("_sync") else "frozen")
        assert cfg.model.startswith("maskrcnn_resnet")
        assert cfg.model.endswith("_ce") == ("_ce" in name)
    # 8 processes x 2 images = the reference batch of 16: the configured lr as it stands
    paper = load_detect_config("coco_maskrcnn_r50_fpn_ce")
    assert scaled_lr(paper, 8) == pytest.approx(0.02)
    assert scaled_lr(paper, 1) == pytest.approx(0.02 * 2 / LR_REFERENCE_BATCH)


def test_config_rejects_bad_values_with_clear_messages() -> None:
    assert tuple(NORM_SETTINGS) == ("frozen", "sync", "train")
    with pytest.raises(ValueError, match=r"unknown .*key.*'lrr' \(did you mean 'lr'"):
        load_detect_config(None, {"lrr": 0.1})
    with pytest.raises(ValueError, match=r"invalid norm='batch': must be one of \('frozen', 'sy"):
        DetectConfig(norm="batch")
    with pytest.raises(ValueError, match="invalid max_size=600: must be a number of pixels >= "
                                         "min_size=800"):  # fmt: skip
        DetectConfig(max_size=600)
    with pytest.raises(ValueError, match="invalid milestones=.*strictly increasing"):
        DetectConfig(milestones=[22, 16])
    with pytest.raises(ValueError, match="invalid amp='fp32'"):
        DetectConfig(amp="fp32")
    with pytest.raises(ValueError, match="detector_kwargs.*free of \\['min_size'\\]"):
        DetectConfig(detector_kwargs={"min_size": 3})
    with pytest.raises(ValueError, match="invalid epochs='many': must be an integer"):
        DetectConfig(epochs="many")
    cfg = load_detect_config(None, parse_detect_overrides(["amp=none", "milestones=[3, 5]",
                                                           "lr=2e-2"]))  # fmt: skip
    assert cfg.amp is None and cfg.milestones == (3, 5) and cfg.lr == 0.02


def test_resume_allows_only_mutable_keys(tmp_path: Path) -> None:
    stored = DetectConfig(data="a", out=str(tmp_path)).to_dict()
    cfg = resume_detect_config(stored, {"max_steps": 9, "data": "b", "threads": None}, tmp_path)
    assert (cfg.max_steps, cfg.data) == (9, "b")
    assert {"max_steps", "data", "workers"} <= RESUME_MUTABLE and "lr" not in RESUME_MUTABLE
    with pytest.raises(ValueError, match=r"cannot change lr when resuming \(lr: checkpoint 0.02, "
                                         r"given 0.1\)"):  # fmt: skip
        resume_detect_config(stored, {"lr": 0.1}, tmp_path)
    with pytest.raises(ValueError, match="cannot resume into out="):
        resume_detect_config(stored, {"out": str(tmp_path / "elsewhere")}, tmp_path)


def test_sync_norm_with_several_cpu_processes_is_refused_up_front() -> None:
    cfg = DetectConfig(norm="sync")
    with pytest.raises(ValueError, match="norm='sync' with 2 processes needs CUDA.*norm=frozen"):
        check_norm_setting(cfg, 2, torch.device("cpu"))
    check_norm_setting(cfg, 1, torch.device("cpu"))  # one process: plain BN / CE
    check_norm_setting(DetectConfig(norm="frozen"), 2, torch.device("cpu"))


# ----------------------------------------------------------------------------- schedule


def test_schedule_is_warmup_times_step_decay_per_iteration() -> None:
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.4)
    sched = build_lr_scheduler(opt, iters_per_epoch=3, milestones=[2, 3], gamma=0.1,
                               warmup_iters=4, warmup_factor=0.001)  # fmt: skip
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = [0.4 * (0.001 + 0.999 * i / 4) for i in range(4)]
    expected = [*warm, 0.4, 0.4, 0.04, 0.04, 0.04, 0.004, 0.004]
    assert lrs == pytest.approx(expected, rel=1e-9)
    state = sched.state_dict()  # plain data: survives a weights-only checkpoint
    restored = build_lr_scheduler(torch.optim.SGD([param], lr=0.4), iters_per_epoch=3,
                                  milestones=[2, 3], gamma=0.1, warmup_iters=4,
                                  warmup_factor=0.001)  # fmt: skip
    restored.load_state_dict(state)
    assert restored.get_last_lr() == pytest.approx(sched.get_last_lr())


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", ["fasterrcnn_resnet18_fpn_ce", "maskrcnn_resnet18_fpn_ce"])
def test_training_iterations_lower_the_loss(name: str, synthetic_coco: Path) -> None:
    """20 iterations at lr 0.01 on the same 4 images (batches of 2, no flips): the mean of the
    last 3 losses is well below that of the first 3."""
    data = load_coco(synthetic_coco, "train2017", train=False, with_masks=name.startswith("mask"))
    loader = detection_loader(Subset(data, range(4)), batch_size=2, shuffle=False, workers=0)
    torch.manual_seed(0)
    model = small_detector(name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    losses: list[float] = []
    for epoch in range(10):
        stats = train_one_epoch(model, opt, loader, epoch=epoch + 1)
        assert stats.iterations == 2 and stats.images == 4 and stats.bad_images == 0
        losses += [d["loss"] for d in stats.losses]
    parts = set(stats.losses[0]) - {"loss"}
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= parts
    assert ("loss_mask" in parts) == name.startswith("mask")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert all(math.isfinite(x) for x in losses)
    assert last < 0.75 * first, losses


class _NanLosses(nn.Module):
    """Returns losses from a weight; NaN from the ``bad``-th call on."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.calls, self.bad = 0, bad

    def forward(self, images, targets):
        self.calls += 1
        scale = math.nan if self.calls >= self.bad else 1.0
        return {"loss_a": self.weight * scale, "loss_b": self.weight * 2}


def test_non_finite_loss_stops_naming_the_iteration_without_stepping() -> None:
    model = _NanLosses(bad=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = ([torch.zeros(3, 4, 4)], [{"boxes": torch.zeros(0, 4)}], 0)
    with pytest.raises(FloatingPointError) as info:
        train_one_epoch(model, opt, [batch] * 5, epoch=2, start_step=1, total=6)
    text = str(info.value)
    assert "epoch 2, iteration 4/6" in text and "loss_a=nan" in text and "loss_b=" in text
    # two good steps were taken (weight 1 - 2 * 0.1 * 3), none with the NaN loss
    assert model.weight.item() == pytest.approx(1 - 2 * 0.3)
    with pytest.raises(FloatingPointError, match="at this iteration"):
        train_step(_NanLosses(bad=1), opt, *batch[:2])


def test_mixed_precision_bf16_step_runs(synthetic_coco: Path) -> None:
    data = load_coco(synthetic_coco, "train2017", train=False, with_masks=False)
    images, targets, _ = next(iter(detection_loader(data, batch_size=2, shuffle=False, workers=0)))
    torch.manual_seed(0)
    model = small_detector("fasterrcnn_resnet18_fpn_ce").train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = model.rpn.head.conv[0][0].weight.detach().clone()
    losses = train_step(model, opt, images, targets, amp="bf16")
    assert all(math.isfinite(v) for v in losses.values())
    assert not torch.equal(before, model.rpn.head.conv[0][0].weight)
    assert model.rpn.head.conv[0][0].weight.dtype == torch.float32


# ----------------------------------------------------------------------------- evaluation


class _Oracle(nn.Module):
    """Predicts the ground truth of each evaluation image (found by its pixels): AP = 1."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.items = [dataset[i] for i in range(len(dataset))]

    def forward(self, images):
        outputs = []
        for image in images:
            (target,) = [t for x, t in self.items if torch.equal(x, image)]
            k = len(target["labels"])
            outputs.append({
                "boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(k),
                "masks": target["masks"][:, None].float(),
            })  # fmt: skip
        return outputs


def test_evaluate_scores_an_oracle_at_ap_one(synthetic_coco: Path) -> None:
    data = load_coco(synthetic_coco, "val2017", train=False)
    loader = detection_loader(data, batch_size=3, shuffle=False, workers=0)
    result = evaluate(_Oracle(data), loader, data.coco, iou_types=("bbox", "segm"))
    assert result.num_images == len(data) == 4 and result.bad_images == 0
    assert result.num_detections == sum(len(data[i][1]["labels"]) for i in range(4))
    for kind in ("bbox", "segm"):
        assert set(result.metrics[kind]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert result.metrics[kind]["AP"] == pytest.approx(1.0)
        assert result.metrics[kind]["AP75"] == pytest.approx(1.0)
    # the data set still decodes its masks and scores the same (mask COCOeval rewrites the
    # ground truth's polygons in place: evaluate must not hand it the data set's own)
    again = evaluate(_Oracle(data), loader, data.coco, iou_types=("bbox", "segm"))
    assert again.metrics["segm"]["AP"] == pytest.approx(1.0)


def test_iou_types_follow_the_mask_head() -> None:
    assert iou_types_of(small_detector("maskrcnn_resnet18_fpn_ce")) == ("bbox", "segm")
    assert iou_types_of(small_detector("fasterrcnn_resnet18_fpn")) == ("bbox",)


# ----------------------------------------------------------------------------- session


def _content(batches) -> list[tuple]:
    return [
        (t["image_id"], x.sum().item(), tuple(t["boxes"].flatten().tolist()))
        for images, targets, _ in batches
        for x, t in zip(images, targets, strict=True)
    ]


def test_train_batches_resume_mid_epoch_with_the_same_images_and_flips(
    synthetic_coco: Path,
) -> None:
    """Epoch e's batches depend on (seed, e) only: a pass started at batch 2 (read by a worker
    process) yields exactly batches 2.. of the full pass, flips included; epochs differ."""
    data = load_coco(synthetic_coco, "train2017", train=True, with_masks=False)
    main = TrainBatches(data, batch_size=2, workers=0, seed=3)
    assert len(main) == 4
    main.set_epoch(1)
    full = _content(main)
    main.set_epoch(0)
    other_epoch = _content(main)
    worker = TrainBatches(data, batch_size=2, workers=1, seed=3)
    worker.set_epoch(1, start_batch=2)
    assert _content(worker) == full[4:]
    assert sorted(i for i, *_ in full) == sorted(data.ids)
    assert [i for i, *_ in full] != [i for i, *_ in other_epoch]
    plain = load_coco(synthetic_coco, "train2017", train=False, with_masks=False)
    unflipped = {t["image_id"]: tuple(t["boxes"].flatten().tolist()) for _, t in
                 (plain[i] for i in range(len(plain)))}  # fmt: skip
    flipped = [i for i, _, boxes in full + other_epoch if boxes != unflipped[i]]
    assert 0 < len(flipped) < len(full + other_epoch)  # flips happen, at random
    with pytest.raises(ValueError, match="start_batch must be in 0..4"):
        main.set_epoch(0, start_batch=5)


def _train_in_process(cfg: DetectConfig) -> DetectRun:
    with distributed.session("cpu") as ctx:
        run = DetectRun(cfg, Path(cfg.out), None, ctx, bar=False, overwrite=False)
        run.run()
    return run


def test_run_checkpoint_round_trip_and_ap_numbers(synthetic_coco: Path, tmp_path: Path) -> None:
    """A Mask R-CNN run of 2 iterations: its files, AP numbers in [0, 1], and the detector
    reloaded from last.pt (weights-only) gives the trained model's outputs exactly."""
    cfg = run_config(synthetic_coco, tmp_path / "run", model="maskrcnn_resnet18_fpn_ce",
                     max_steps=2)  # fmt: skip
    run = _train_in_process(cfg)
    out = Path(cfg.out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "last.pt", "metrics.json", "metrics.jsonl"
    ]
    final = json.loads((out / "metrics.json").read_text())
    assert final["global_step"] == 2 and final["stopped_at_max_steps"] is True
    for kind in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            value = final[kind][name]
            assert isinstance(value, float) and 0.0 <= value <= 1.0
    (record,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["partial"] is True and record["step"] == 2 and record["epoch"] == 1
    assert record["bbox"] == pytest.approx(run.state.metrics["bbox"], nan_ok=True)
    assert record["eval_images"] == 4 and math.isfinite(record["train_loss"])

    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["kind"] == "detection" and ckpt["global_step"] == 2 and ckpt["num_classes"] == 4
    model, loaded_cfg, _ = load_detector(out / "last.pt")
    assert loaded_cfg == run.cfg and not model.training
    data = load_coco(synthetic_coco, "val2017", train=False)
    images = [data[i][0] for i in range(2)]
    run.model.eval()
    with torch.no_grad():
        want, got = run.model(images), model(images)
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys() == {"boxes", "labels", "scores", "masks"}
        assert len(a["boxes"]) > 0
        for key in a:
            assert torch.equal(a[key], b[key]), key


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)
    return {"model": ckpt["model"], "momentum": ckpt["optimizer"]["state"]}


@pytest.fixture(scope="module")
def straight_run(synthetic_coco: Path, tmp_path_factory) -> Path:
    """4 iterations (one epoch of 8 images in batches of 2) without interruption."""
    cfg = run_config(synthetic_coco, tmp_path_factory.mktemp("straight") / "run", max_steps=4)
    result = train_detector(cfg)
    assert result.global_step == 4 and result.epochs == 1
    return Path(cfg.out)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a / "last.pt"), _weights(b / "last.pt")
    assert wa["model"].keys() == wb["model"].keys()
    differ = [k for k in wa["model"] if not torch.equal(wa["model"][k], wb["model"][k])]
    assert not differ, differ[:5]
    for i, state in wa["momentum"].items():
        assert torch.equal(state["momentum_buffer"], wb["momentum"][i]["momentum_buffer"])


def test_stop_at_max_steps_then_resume_gives_the_same_weights(
    straight_run: Path, synthetic_coco: Path, tmp_path: Path
) -> None:
    cfg = run_config(synthetic_coco, tmp_path / "run", max_steps=2)
    assert train_detector(cfg).global_step == 2
    mid = _weights(Path(cfg.out) / "last.pt")["model"]
    result = resume_detector(cfg.out, {"max_steps": 4})
    assert result.global_step == 4 and result.epochs == 1
    _assert_same_weights(straight_run, Path(cfg.out))
    final = _weights(straight_run / "last.pt")["model"]
    assert not all(torch.equal(mid[k], v) for k, v in final.items())  # the check can fail
    records = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r.get("partial", False)) for r in records] == [(1, False)]


def test_killed_run_resumes_from_its_last_checkpoint_to_the_same_weights(
    straight_run: Path, synthetic_coco: Path, tmp_path: Path, monkeypatch
) -> None:
    """Checkpoints every iteration; the process dies inside iteration 3 (after the forward,
    before the optimizer step); --resume continues from iteration 2 to the same weights."""
    import cenet.detection.engine as engine

    real_step, calls = engine.train_step, []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    cfg = run_config(synthetic_coco, tmp_path / "run", max_steps=4, checkpoint_every=1)
    monkeypatch.setattr(engine, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_detector(cfg)
    monkeypatch.setattr(engine, "train_step", real_step)
    ckpt = load_checkpoint(Path(cfg.out) / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (0, 2, 2)
    result = resume_detector(Path(cfg.out) / "last.pt")
    assert result.global_step == 4
    _assert_same_weights(straight_run, Path(cfg.out))


def test_new_run_refuses_a_non_empty_directory_and_resume_refuses_changes(
    straight_run: Path, synthetic_coco: Path
) -> None:
    cfg = run_config(synthetic_coco, straight_run, max_steps=4)
    with pytest.raises(FileExistsError, match="continue it with --resume"):
        train_detector(cfg)
    with pytest.raises(ValueError, match="cannot change lr when resuming"):
        resume_detector(straight_run, {"lr": 0.5})
