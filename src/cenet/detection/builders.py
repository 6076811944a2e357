"""Faster R-CNN and Mask R-CNN (torchvision's) with ResNet / CE-ResNet FPN backbones, the CE
paper's detection models (Sec. 5.3, Table 5), with a registry in the manner of
:mod:`cenet.models.registry`.

Names: ``{fasterrcnn,maskrcnn}_resnet{18,50,101}_fpn`` (BN backbone, the baseline rows) and the
same with ``_ce`` (CE-ResNet backbone with the paper's CE placements). Every builder takes the
keywords of torchvision's ``fasterrcnn_resnet50_fpn`` with ``weights_backbone`` replaced by
``backbone_checkpoint`` (a cenet ImageNet checkpoint), plus ``norm`` (the paper's two
settings, :data:`~cenet.detection.backbone.NORM_SETTINGS`), and passes every other keyword to
``FasterRCNN`` / ``MaskRCNN`` (``min_size``, ``max_size``, ``box_detections_per_img`` ...;
unknown ones raise ``TypeError`` there).
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable

from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from cenet.detection.backbone import resnet_fpn_backbone

__all__ = ["create_detector", "list_detectors"]

_DETECTORS: dict[str, Callable[..., FasterRCNN]] = {}
_HEADS = {"fasterrcnn": FasterRCNN, "maskrcnn": MaskRCNN}
_DEPTHS = (18, 50, 101)


def _keywords(cls: type) -> set[str]:
    """The named keywords of ``cls`` and of the image transform it passes ``**kwargs`` to."""
    names = set()
    for fn in (cls.__init__, FasterRCNN.__init__, GeneralizedRCNNTransform.__init__):
        names |= {p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self", "backbone", "num_classes"}


def _check_keywords(cls: type, kwargs: dict) -> None:
    """torchvision's detectors pass unknown keywords on to their transform, which ignores
    them: a typo would be lost silently, so it is refused here.

    Raises:
        TypeError: naming the unknown keywords and the closest valid ones.
    """
    valid = _keywords(cls)
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        close = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        hints = ", ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "")
                          for k, c in close.items())
        raise TypeError(f"{cls.__name__} takes no keyword {hints}; valid: "
                        f"{', '.join(sorted(valid))}")


def _make_builder(head: str, depth: int, ce: bool) -> Callable[..., FasterRCNN]:
    cls = _HEADS[head]

    def builder(
        *,
        num_classes: int = 91,
        norm: str = "frozen",
        backbone_checkpoint: str | os.PathLike[str] | None = None,
        trainable_backbone_layers: int = 3,
        **detector_kwargs,
    ) -> FasterRCNN:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (the background and at least "
                             f"one category; COCO: 91), got {num_classes!r}")
        _check_keywords(cls, detector_kwargs)
        backbone = resnet_fpn_backbone(depth, ce=ce, norm=norm,
                                       trainable_layers=trainable_backbone_layers,
                                       checkpoint=backbone_checkpoint)
        return cls(backbone, num_classes=num_classes, **detector_kwargs)

    name = f"{head}_resnet{depth}_fpn{'_ce' if ce else ''}"
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"torchvision's {cls.__name__} with a {'CE-' if ce else ''}ResNet-{depth}-FPN backbone"
        f"{' (CE placements of cenet.models.resnet' + str(depth) + '_ce)' if ce else ''}.\n\n"
        f"Args:\n"
        f"    num_classes: outputs of the box classifier, background included (COCO: 91,\n"
        f"        labels are the category ids).\n"
        f"    norm: ``\"frozen\"`` or ``\"sync\"`` (CE paper Table 5), or ``\"train\"``; see\n"
        f"        :func:`cenet.detection.backbone.set_norm_setting`).\n"
        f"    backbone_checkpoint: a cenet ImageNet checkpoint of ``resnet{depth}"
        f"{'_ce' if ce else ''}`` (run directory or file) or a torchvision state dict; keys\n"
        f"        are checked, missing/unexpected ones logged.\n"
        f"    trainable_backbone_layers: 0-5 stages trained, from layer4 (torchvision's).\n"
        f"    **detector_kwargs: keywords of torchvision's {cls.__name__}.\n\n"
        f"Shape:\n"
        f"    as torchvision's detectors: a list of (3, H, W) images in [0, 1] (and targets in\n"
        f"    training); returns losses (training) or per-image boxes, labels, scores"
        f"{', masks' if head == 'maskrcnn' else ''}.\n\n"
        f"Raises:\n"
        f"    ValueError: num_classes < 2, an unknown norm, trainable_backbone_layers outside\n"
        f"        0-5, a checkpoint that does not fit.\n"
        f"    TypeError: an unknown keyword.\n"
    )
    _DETECTORS[name] = builder
    return builder


for _head in _HEADS:
    for _depth in _DEPTHS:
        for _ce in (False, True):
            _b = _make_builder(_head, _depth, _ce)
            globals()[_b.__name__] = _b
            __all__.append(_b.__name__)


def list_detectors() -> list[str]:
    """Sorted names of the detection builders."""
    return sorted(_DETECTORS)


def create_detector(name: str, **kwargs) -> FasterRCNN:
    """Build the detector ``name`` (:func:`list_detectors`) with the builder's keywords.

    Raises:
        ValueError: for an unknown name (with close matches), or as the builder.
        TypeError: for a keyword neither the builder nor torchvision's detector takes.
    """
    try:
        builder = _DETECTORS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_DETECTORS), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown detector {name!r}{hint} (cenet.detection.list_detectors() "
                         f"lists all {len(_DETECTORS)})") from None
    return builder(**kwargs)
