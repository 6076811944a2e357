"""Detection and instance segmentation with CE backbones (CE paper Sec. 5.3, Table 5):
torchvision's Faster R-CNN and Mask R-CNN on (CE-)ResNet-FPN bodies, COCO data and metrics,
and the ``cenet detect`` trainer.

    >>> from cenet.detection import create_detector
    >>> model = create_detector("maskrcnn_resnet50_fpn_ce", num_classes=91, norm="frozen",
    ...                         backbone_checkpoint="runs/imagenet_resnet50_ce")
"""

from cenet.detection import builders
from cenet.detection.backbone import (
    NORM_SETTINGS,
    LoadReport,
    load_backbone_checkpoint,
    resnet_fpn_backbone,
    set_norm_setting,
)
from cenet.detection.builders import create_detector, list_detectors

__all__ = [
    "NORM_SETTINGS", "LoadReport", "builders", "create_detector", "list_detectors",
    "load_backbone_checkpoint", "resnet_fpn_backbone", "set_norm_setting",
]
