"""Splits: related images never straddle a line, stratified, reproducible, and reused;
k-fold splits derived from a base split."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from fractured.training.datasets.base import DatasetError, Sample, SampleSet
from fractured.training.folds import BASE_DIR, fold_of, fold_split_for, make_fold_split
from fractured.training.splits import (
    CSV_NAME,
    JSON_NAME,
    FoldRecord,
    SplitParameters,
    load_split,
    make_split,
    relative_path,
    split_for,
    write_split,
)

BODY_PARTS = ("hand", "leg", "hip")
#: Samples 10-19 are near-duplicates of 0-9 (copied hashes); 21-23 and 24-25 are two
#: patients; 30-33 share one study.
N = 400


def dataset(root: Path, n: int = N, *, splits: list[str | None] | None = None) -> SampleSet:
    rng = np.random.default_rng(1)
    samples = []
    for i in range(n):
        patient = f"P{i // 3}" if 20 <= i < 26 else ""
        study = "S-shared" if 30 <= i < 34 else ""
        samples.append(Sample(root / "images" / f"img{i:04d}.png",
                              label=int(rng.random() < 0.25), body_part=BODY_PARTS[i % 3],
                              patient=patient, study=study,
                              split=splits[i] if splits else None))
    return SampleSet("test", root, tuple(samples))


def hashes_for(n: int = N) -> np.ndarray:
    """Random 64-bit hashes (pairs ~32 bits apart) with 10-19 copies of 0-9."""
    hashes = np.random.default_rng(7).integers(0, 2**63, size=(n, 4), dtype=np.uint64)
    hashes[10:20] = hashes[0:10]
    return hashes


RELATED = [[i, i + 10] for i in range(10)] + [[21, 22, 23], [24, 25], [30, 31, 32, 33]]


@pytest.fixture
def data(tmp_path: Path) -> SampleSet:
    return dataset(tmp_path / "data")


def split_of(split, sample_set: SampleSet, index: int) -> str:
    return split.assignment[relative_path(sample_set, sample_set.samples[index])]


def test_related_images_stay_on_one_side(data: SampleSet) -> None:
    split = make_split(data, hashes=hashes_for())
    for group in RELATED:
        assert len({split_of(split, data, i) for i in group}) == 1, group
        assert len({split.groups[relative_path(data, data.samples[i])] for i in group}) == 1
    assert split.cross_split_groups() == []
    summary = split.summary()
    assert summary["source"] == "made"
    assert summary["cross_split_groups"] == 0 and summary["warning"] is None
    assert summary["duplicate_groups"] == 10 and summary["duplicate_images"] == 20


def test_same_seed_same_split_other_seed_other_split(data: SampleSet) -> None:
    hashes = hashes_for()
    first = make_split(data, seed=3, hashes=hashes).assignment
    assert make_split(data, seed=3, hashes=hashes).assignment == first
    other = make_split(data, seed=4, hashes=hashes).assignment
    assert other != first
    assert sum(first[path] != other[path] for path in first) > N // 10


def test_stratified_by_label_and_body_part(data: SampleSet) -> None:
    split = make_split(data, val=0.2, test=0.2, hashes=hashes_for())
    sizes = Counter(split.assignment.values())
    assert abs(sizes["train"] - 0.6 * N) <= 6 and abs(sizes["val"] - 0.2 * N) <= 6
    overall = np.mean([s.label for s in data.samples])
    for name in ("train", "val", "test"):
        chosen = split.samples(data, name)
        assert abs(np.mean([s.label for s in chosen]) - overall) < 0.02, name
        strata = Counter((s.label, s.body_part) for s in chosen)
        totals = Counter((s.label, s.body_part) for s in data.samples)
        fraction = {"train": 0.6, "val": 0.2, "test": 0.2}[name]
        for stratum, total in totals.items():
            assert abs(strata[stratum] - fraction * total) <= 4, (name, stratum)


def test_a_zero_fraction_leaves_that_split_empty(data: SampleSet) -> None:
    split = make_split(data, val=0.0, test=0.2, hashes=hashes_for())
    assert split.samples(data, "val") == []
    assert split.summary()["images"]["val"] == 0
    assert len(split.samples(data, "train")) + len(split.samples(data, "test")) == N


def test_samples_returns_each_sample_once_in_dataset_order(data: SampleSet) -> None:
    split = make_split(data, hashes=hashes_for())
    parts = {name: split.samples(data, name) for name in ("train", "val", "test")}
    assert sorted(s.path for part in parts.values() for s in part) == [s.path for s in data.samples]
    assert parts["test"] == [s for s in data.samples if s in parts["test"]]
    with pytest.raises(ValueError, match="split must be one of"):
        split.samples(data, "holdout")


def test_shipped_split_is_kept_and_crossing_duplicates_reported(tmp_path: Path) -> None:
    shipped: list[str | None] = ["train" if i % 5 else "test" for i in range(N)]
    # 0..9 ~ 10..19: pairs (0, 10), (5, 15) have both in test; (1, 11) both train
    shipped[11] = "test"  # 1 is train, 11 test: one crossing near-duplicate pair
    data = dataset(tmp_path / "data", splits=shipped)
    split = make_split(data, hashes=hashes_for())
    assert [split_of(split, data, i) for i in range(N)] == shipped
    summary = split.summary()
    assert summary["source"] == "shipped" and split.shipped
    crossing = split.cross_split_groups()
    # the near-duplicate pair 1~11 and the patient and study groups that straddle
    expected = [g for g in RELATED if len({shipped[i] for i in g}) > 1]
    assert [1, 11] in expected
    assert sorted(sorted(g) for g in crossing) == sorted(
        sorted(relative_path(data, data.samples[i]) for i in g) for g in expected)
    assert summary["cross_split_groups"] == len(expected)
    assert "cross the dataset's own splits" in summary["warning"]


def test_partly_shipped_split_is_refused(tmp_path: Path) -> None:
    data = dataset(tmp_path / "data", splits=["train"] * (N - 1) + [None])
    with pytest.raises(DatasetError, match=f"{N - 1} of {N} images carry a split"):
        make_split(data, hashes=hashes_for())


def test_repeated_images_and_bad_fractions_are_refused(data: SampleSet) -> None:
    twice = replace(data, samples=(*data.samples, data.samples[0]))
    with pytest.raises(DatasetError, match="listed more than once"):
        make_split(twice, hashes=hashes_for(N + 1))
    with pytest.raises(ValueError, match="leave some images for training"):
        make_split(data, val=0.5, test=0.5, hashes=hashes_for())
    with pytest.raises(ValueError, match="hashes for"):
        make_split(data, hashes=hashes_for()[:-1])


def test_write_then_load_round_trip(data: SampleSet, tmp_path: Path) -> None:
    split = make_split(data, seed=5, val=0.1, test=0.2, hashes=hashes_for())
    write_split(split, tmp_path / "split")
    meta = json.loads((tmp_path / "split" / JSON_NAME).read_text())
    assert meta["seed"] == 5 and meta["val"] == 0.1 and meta["samples"] == N
    assert meta["format"] == "test" and len(meta["sha256"]) == 64 and meta["created"]
    header = (tmp_path / "split" / CSV_NAME).read_text().splitlines()[0]
    assert header == "relative_path,split,group,label,body_part"
    loaded = load_split(tmp_path / "split", data)
    assert loaded == split
    assert loaded.summary() == split.summary()


def test_a_written_split_is_never_overwritten(data: SampleSet, tmp_path: Path) -> None:
    split = make_split(data, hashes=hashes_for())
    write_split(split, tmp_path / "split")
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_split(split, tmp_path / "split")


def test_load_refuses_a_changed_dataset_naming_the_change(data: SampleSet,
                                                          tmp_path: Path) -> None:
    write_split(make_split(data, hashes=hashes_for()), tmp_path / "split")
    samples = list(data.samples)
    samples[3] = replace(samples[3], label=1 - samples[3].label)
    del samples[7]
    samples.append(Sample(data.root / "images" / "new.png", label=0))
    with pytest.raises(DatasetError) as raised:
        load_split(tmp_path / "split", replace(data, samples=tuple(samples)))
    message = str(raised.value)
    assert "1 added (images/new.png)" in message
    assert "1 missing (images/img0007.png)" in message
    assert "1 relabelled (images/img0003.png)" in message


def test_load_refuses_an_edited_csv(data: SampleSet, tmp_path: Path) -> None:
    write_split(make_split(data, hashes=hashes_for()), tmp_path / "split")
    csv_path = tmp_path / "split" / CSV_NAME
    csv_path.write_text(csv_path.read_text().replace(",test,", ",train,", 1))
    with pytest.raises(DatasetError, match="edited after it was written"):
        load_split(tmp_path / "split", data)


def test_split_for_writes_then_reuses(data: SampleSet, tmp_path: Path) -> None:
    directory = tmp_path / "split"
    made = split_for(data, directory, seed=2, hashes=hashes_for())
    assert (directory / CSV_NAME).exists() and (directory / JSON_NAME).exists()
    # No hashes given and the images do not exist: only a reuse can succeed.
    with capture_logs() as logs:
        again = split_for(data, directory, seed=2)
    assert again == made
    assert [entry["event"] for entry in logs] == ["split.reused"]


def test_split_for_refuses_other_parameters(data: SampleSet, tmp_path: Path) -> None:
    directory = tmp_path / "split"
    split_for(data, directory, seed=2, hashes=hashes_for())
    with pytest.raises(DatasetError, match=r"seed=2.*asked for seed=3.*another directory"):
        split_for(data, directory, seed=3, hashes=hashes_for())
    with pytest.raises(DatasetError, match="duplicate_threshold=6"):
        split_for(data, directory, seed=2, duplicate_threshold=6, hashes=hashes_for())


def test_parameters_compare_across_a_json_round_trip() -> None:
    parameters = SplitParameters(seed=1, val=0.1, test=0.3, duplicate_threshold=4)
    assert SplitParameters(**json.loads(json.dumps(asdict(parameters)))) == parameters


def test_hashes_are_computed_from_the_images_when_not_given(tmp_path: Path) -> None:
    """Hashes made here from the images: a flipped copy lands beside its original, and
    an image that cannot be decoded does not stop the split."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(12):
        image = cv2.GaussianBlur(rng.random((48, 40)).astype(np.float32), (0, 0), 4)
        if i == 11:
            image = cv2.imread(str(root / "images" / "img00.png"), cv2.IMREAD_GRAYSCALE)[:, ::-1]
        else:
            image = (255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"img{i:02d}.png"), image)
        samples.append(Sample(root / "images" / f"img{i:02d}.png", label=i % 2))
    (root / "images" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    samples.append(Sample(root / "images" / "truncated.jpg", label=0))
    data = SampleSet("test", root, tuple(samples))
    for seed in range(4):
        split = make_split(data, val=0.25, test=0.25, seed=seed)
        assert split.duplicate_groups == (("images/img00.png", "images/img11.png"),)
        assert split_of(split, data, 0) == split_of(split, data, 11)
    # The unreadable image is listed, still placed, and kept through a round trip.
    assert split.unreadable == ("images/truncated.jpg",)
    assert split.summary()["unreadable_images"] == 1
    assert "images/truncated.jpg" in split.assignment
    write_split(split, tmp_path / "split")
    assert load_split(tmp_path / "split", data) == split


# -- k-fold splits derived from a base split (training.folds) ---------------------------

K = 5


def parts_of(split) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for path, name in split.assignment.items():
        parts[name].add(path)
    return parts


def test_folds_partition_train_and_val_by_whole_groups_and_keep_the_test_part(
        data: SampleSet) -> None:
    base = make_split(data, hashes=hashes_for())
    pool = parts_of(base)["train"] | parts_of(base)["val"]
    splits = [make_fold_split(base, "ab" * 32, k=K, fold=fold, seed=0) for fold in range(K)]
    vals = [parts_of(split)["val"] for split in splits]
    assert sorted(path for val in vals for path in val) == sorted(pool)  # each once
    base_test = [entry for entry in base.entries if entry.split == "test"]
    labels = {entry.path: entry.label for entry in base.entries}
    strata = Counter((entry.label, entry.body_part) for entry in base.entries
                     if entry.path in pool)
    share = np.mean([labels[path] for path in pool])
    for fold, (split, val) in enumerate(zip(splits, vals, strict=True)):
        assert parts_of(split)["train"] == pool - val
        assert [entry for entry in split.entries if entry.split == "test"] == base_test
        assert split.groups == base.groups and split.cross_split_groups() == []
        for group in RELATED:
            assert len({split_of(split, data, i) for i in group}) == 1, (fold, group)
        assert split.folds == FoldRecord("ab" * 32, K, fold, 0)
        assert abs(len(val) - len(pool) / K) <= 4
        assert abs(np.mean([labels[path] for path in val]) - share) < 0.03, fold
        in_val = Counter((entry.label, entry.body_part) for entry in split.entries
                         if entry.split == "val")
        for stratum, total in strata.items():
            assert abs(in_val[stratum] - total / K) <= 3, (fold, stratum)


def test_folds_are_dealt_by_the_seed_alone_never_by_the_fold(data: SampleSet) -> None:
    base = make_split(data, hashes=hashes_for())
    dealt = fold_of(base, k=K, seed=0)
    assert fold_of(base, k=K, seed=0) == dealt
    other = fold_of(base, k=K, seed=1)
    assert sum(dealt[path] != other[path] for path in dealt) > len(dealt) // 2
    for fold in range(K):
        split = make_fold_split(base, "0" * 64, k=K, fold=fold, seed=0)
        assert parts_of(split)["val"] == {path for path, i in dealt.items() if i == fold}


def test_more_folds_than_groups_are_refused(tmp_path: Path) -> None:
    small = dataset(tmp_path / "data", n=20)  # ten near-duplicate pairs: ten groups
    base = make_split(small, val=0.0, test=0.5, hashes=hashes_for(20))
    with pytest.raises(DatasetError, match=r"\[data\]\.folds: 7 folds need at least 7 groups"
                                           r".*there are 5"):
        fold_of(base, k=7, seed=0)
    assert set(fold_of(base, k=5, seed=0).values()) == set(range(5))


def test_fold_split_for_makes_the_base_beside_the_fold_and_reuses_it(
        data: SampleSet, tmp_path: Path) -> None:
    directory = tmp_path / "run" / "split"
    split = fold_split_for(data, directory, folds=K, fold=2, seed=3, hashes=hashes_for())
    base_meta = json.loads((directory / BASE_DIR / JSON_NAME).read_text())
    meta = json.loads((directory / JSON_NAME).read_text())
    assert meta["folds"] == {"base_csv_sha256": base_meta["csv_sha256"], "k": K, "fold": 2,
                             "seed": 3}
    assert load_split(directory, data) == split
    # The base is the split a plain run of these settings makes: same test images.
    plain = make_split(data, seed=3, hashes=hashes_for())
    assert parts_of(split)["test"] == parts_of(plain)["test"]
    assert load_split(directory / BASE_DIR, data).assignment == plain.assignment
    with capture_logs() as logs:  # no hashes and no images: only a reuse can succeed
        again = fold_split_for(data, directory, folds=K, fold=2, seed=3)
    assert again == split and [entry["event"] for entry in logs] == ["split.fold_reused"]
    for asked, key in (({"folds": 4, "fold": 2, "seed": 3}, "folds"),
                       ({"folds": K, "fold": 1, "seed": 3}, "fold"),
                       ({"folds": K, "fold": 2, "seed": 0}, "split_seed")):
        with pytest.raises(DatasetError, match=rf"fold 2 of {K}.*\[data\]\.{key} asks for"):
            fold_split_for(data, directory, **asked)


def test_a_given_base_is_copied_as_it_is_and_must_stay_the_same(data: SampleSet,
                                                                 tmp_path: Path) -> None:
    given = tmp_path / "given"
    write_split(make_split(data, seed=9, val=0.1, test=0.2, hashes=hashes_for()), given)
    directory = tmp_path / "run" / "split"
    split = fold_split_for(data, directory, folds=3, fold=0, seed=1, base_split=given,
                           val=0.3, test=0.3)  # the base's own fractions hold
    for name in (CSV_NAME, JSON_NAME):
        assert (directory / BASE_DIR / name).read_bytes() == (given / name).read_bytes()
    assert split.parameters == SplitParameters(seed=9, val=0.1, test=0.2)
    assert parts_of(split)["test"] == parts_of(load_split(given, data))["test"]
    assert split.folds is not None and split.folds.base_csv_sha256 == \
        json.loads((given / JSON_NAME).read_text())["csv_sha256"]
    # A run stopped after its base was copied, resumed with another base_split:
    (directory / JSON_NAME).unlink()
    other = tmp_path / "other"
    write_split(make_split(data, seed=8, hashes=hashes_for()), other)
    with pytest.raises(DatasetError, match=r"\[data\]\.base_split: .*other is another split"):
        fold_split_for(data, directory, folds=3, fold=0, seed=1, base_split=other)


def test_a_plain_split_where_the_fold_split_belongs_is_refused(data: SampleSet,
                                                               tmp_path: Path) -> None:
    directory = tmp_path / "run" / "split"
    write_split(make_split(data, hashes=hashes_for()), directory)  # copied in by hand
    with pytest.raises(DatasetError, match=r"not a fold split.*as \[data\]\.base_split"):
        fold_split_for(data, directory, folds=3, fold=0, seed=0, hashes=hashes_for())
    assert not (directory / BASE_DIR).exists()
