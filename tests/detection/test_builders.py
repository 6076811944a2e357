"""Detection builders: torchvision's Faster/Mask R-CNN on cenet's (CE-)ResNet-FPN bodies, the
paper's two norm settings (Table 5), checked backbone checkpoints."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d

import cenet
from cenet.detection import create_detector, list_detectors, load_backbone_checkpoint
from cenet.layers import FrozenChannelEquilibrium, SyncChannelEquilibrium
from cenet.train.checkpoint import FORMAT_VERSION, REQUIRED_KEYS, atomic_save

SMALL = {"min_size": 64, "max_size": 64}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images_and_targets(n: int = 2) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(n)]
    targets = []
    for i in range(n):
        masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
        masks[0, 4:30, 6:34] = 1
        masks[1, 36 - i : 60, 30:58] = 1
        targets.append({"boxes": torch.tensor([[6.0, 4, 34, 30], [30, 36 - i, 58, 60]]),
                        "labels": torch.tensor([1, 3]), "masks": masks})
    return images, targets


def test_the_names_the_issue_asks_for():
    names = set(list_detectors())
    for head in ("fasterrcnn", "maskrcnn"):
        for depth in (18, 50, 101):
            assert {f"{head}_resnet{depth}_fpn", f"{head}_resnet{depth}_fpn_ce"} <= names
    from cenet.detection.builders import maskrcnn_resnet18_fpn_ce

    assert maskrcnn_resnet18_fpn_ce.__name__ == "maskrcnn_resnet18_fpn_ce"


@pytest.mark.parametrize("head,tv_builder", [("fasterrcnn", fasterrcnn_resnet50_fpn),
                                             ("maskrcnn", maskrcnn_resnet50_fpn)])
def test_the_bn_baseline_is_torchvisions_model(head, tv_builder):
    """The plain-BN R50 detector has torchvision's state-dict keys and shapes; with
    torchvision's weights loaded it computes torchvision's detections."""
    torch.manual_seed(0)
    ref = tv_builder(weights=None, weights_backbone=None, num_classes=5, **SMALL).eval()
    ours = create_detector(f"{head}_resnet50_fpn", num_classes=5, norm="sync", **SMALL).eval()
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in ref.state_dict().items()}
    with torch.no_grad():  # non-trivial BN statistics, so that a wrong mapping shows
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    images, _ = _images_and_targets(1)
    with torch.no_grad():
        torch.testing.assert_close(ours.backbone(images[0][None]), ref.backbone(images[0][None]))
        a, b = ours(images)[0], ref(images)[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])
    torch.testing.assert_close(a["scores"], b["scores"])


@pytest.mark.parametrize("name", ["fasterrcnn_resnet18_fpn_ce", "maskrcnn_resnet18_fpn_ce",
                                  "maskrcnn_resnet18_fpn"])
@pytest.mark.parametrize("norm", ["frozen", "sync"])
def test_forward_backward_in_train_and_eval(name, norm):
    torch.manual_seed(0)
    model = create_detector(name, num_classes=4, norm=norm, **SMALL)
    images, targets = _images_and_targets()
    losses = model.train()(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    if name.startswith("maskrcnn"):
        expected.add("loss_mask")
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        out = model.eval()(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4
    if name.startswith("maskrcnn"):
        assert out[0]["masks"].shape[1:] == (1, 64, 64)


def _frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    body = model.backbone.body
    return {k: v.clone() for k, v in body.state_dict().items()
            if any(s in k for s in ("bn", "attn", "downsample.1"))}


def test_frozen_setting_really_frozen():
    """BN and CE of the body are their frozen forms: no parameters, buffers unchanged by
    training steps, and the stem and layer1 (trainable_backbone_layers=3) get no gradient."""
    torch.manual_seed(0)
    model = create_detector("maskrcnn_resnet18_fpn_ce", num_classes=4, norm="frozen", **SMALL)
    body = model.backbone.body
    kinds = {type(m) for m in body.modules()}
    assert {FrozenBatchNorm2d, FrozenChannelEquilibrium} <= kinds
    assert not kinds & {nn.BatchNorm2d, cenet.ChannelEquilibrium}
    trained = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"}
    before = _frozen_state(model)
    frozen_convs = {n: p.clone() for n, p in body.named_parameters() if not p.requires_grad}
    trained_conv = body.layer4[0].conv1.weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    images, targets = _images_and_targets()
    for _ in range(2):
        sum(model.train()(images, targets).values()).backward()
        opt.step()
        opt.zero_grad()
    after = _frozen_state(model)
    assert before.keys() == after.keys() and len(before) > 20
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, frozen_convs[n]) for n, p in body.named_parameters()
               if n in frozen_convs)
    assert not torch.equal(body.layer4[0].conv1.weight, trained_conv)


def test_sync_setting_trains_bn_and_ce_statistics_but_not_the_gate():
    torch.manual_seed(0)
    model = create_detector("fasterrcnn_resnet18_fpn_ce", num_classes=4, norm="sync",
                            trainable_backbone_layers=5, **SMALL)
    body = model.backbone.body
    ce = body.layer3[0].attn
    assert isinstance(ce, SyncChannelEquilibrium) and isinstance(body.bn1, nn.SyncBatchNorm)
    assert body.layer3[0].bn2.weight.requires_grad
    assert not ce.theta.requires_grad
    assert not any(p.requires_grad for p in ce.ir.parameters())
    wm = ce.bd.running_wm.clone()
    gate = ce.ir.fc1.weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    images, targets = _images_and_targets()
    sum(model.train()(images, targets).values()).backward()
    opt.step()
    assert not torch.equal(ce.bd.running_wm, wm)  # batch statistics are used and tracked
    assert torch.equal(ce.ir.fc1.weight, gate)


def test_train_setting_trains_every_norm_parameter():
    """"train" (from scratch): plain BN and CE with batch statistics, gate and λ trained."""
    from cenet.cli.detect import _NORMS
    from cenet.detection import NORM_SETTINGS

    assert _NORMS == NORM_SETTINGS
    model = create_detector("fasterrcnn_resnet18_fpn_ce", num_classes=4, norm="train",
                            trainable_backbone_layers=5, **SMALL)
    body = model.backbone.body
    assert type(body.layer3[0].attn) is cenet.ChannelEquilibrium
    assert type(body.bn1) is nn.BatchNorm2d
    assert all(p.requires_grad for p in body.parameters())
    images, targets = _images_and_targets()
    sum(model.train()(images, targets).values()).backward()
    assert body.layer3[0].attn.theta.grad is not None
    assert body.layer3[0].attn.ir.fc1.weight.grad.abs().sum() > 0


def test_backbone_checkpoint_keys_are_checked(tmp_path, caplog):
    torch.manual_seed(0)
    src = cenet.create_model("resnet18_ce", num_classes=10)
    with torch.no_grad():
        src.layer2[0].conv1.weight.fill_(0.25)
        src.layer3[1].attn.bd.running_wm.mul_(0.5)
    ckpt = {**dict.fromkeys(REQUIRED_KEYS), "format_version": FORMAT_VERSION,
            "config": {"model": "resnet18_ce"}, "model": src.state_dict()}  # as cenet train
    path = atomic_save(ckpt, tmp_path / "last.pt")
    model = create_detector("fasterrcnn_resnet18_fpn_ce", num_classes=3, backbone_checkpoint=path,
                            **SMALL)
    body = model.backbone.body
    assert torch.equal(body.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
    torch.testing.assert_close(body.layer3[1].attn.bd.running_wm, src.layer3[1].attn.bd.running_wm)
    # a BN checkpoint into a CE body: CE keys missing, reported (not an error)
    bn_path = tmp_path / "resnet18.pth"
    torch.save(cenet.create_model("resnet18").state_dict(), bn_path)
    body = cenet.create_model("resnet18_ce")
    with caplog.at_level(logging.WARNING, logger="cenet.detection.backbone"):
        report = load_backbone_checkpoint(body, bn_path)
    assert report.missing
    assert all(".attn." in k or k.startswith("stem_attn") for k in report.missing)
    assert report.unexpected == () and set(report.classifier) == {"fc.weight", "fc.bias"}
    assert "missing in the checkpoint" in caplog.text
    # another architecture: shapes differ
    torch.save(cenet.create_model("resnet50").state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="shapes differ"):
        create_detector("fasterrcnn_resnet18_fpn", backbone_checkpoint=tmp_path / "r50.pth")
    torch.save({"a.b": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="shares no weight name"):
        create_detector("fasterrcnn_resnet18_fpn", backbone_checkpoint=tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_detector("fasterrcnn_resnet18_fpn", backbone_checkpoint=tmp_path / "nowhere.pth")


def test_bad_arguments():
    with pytest.raises(ValueError, match="did you mean 'maskrcnn_resnet50_fpn_ce'"):
        create_detector("maskrcnn_resnet50_fpn_ec")
    with pytest.raises(ValueError, match="norm must be one of"):
        create_detector("fasterrcnn_resnet18_fpn", norm="bn")
    with pytest.raises(ValueError, match="trainable_layers must be an int in 0-5"):
        create_detector("fasterrcnn_resnet18_fpn", trainable_backbone_layers=6)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        create_detector("fasterrcnn_resnet18_fpn", num_classes=1)
    with pytest.raises(TypeError, match="'min_sise' \\(did you mean 'min_size'"):
        create_detector("fasterrcnn_resnet18_fpn", min_sise=64)


def test_frozen_detector_state_dict_round_trip():
    torch.manual_seed(0)
    a = create_detector("maskrcnn_resnet18_fpn_ce", num_classes=4, **SMALL).eval()
    b = create_detector("maskrcnn_resnet18_fpn_ce", num_classes=4, **SMALL).eval()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    images, _ = _images_and_targets(1)
    with torch.no_grad():
        torch.testing.assert_close(a.backbone(images[0][None]), b.backbone(images[0][None]))
