"""Pixel decoding in a child process (daemon.decoding): the same pixels as decoding in
the node's process, its errors as they were, and a decoder killed mid-image (as the
OOM killer would) costs that image only: the node, its listener and the rest of the
study go on."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from fractured.daemon.decoding import Decoder, DecoderDied
from fractured.engine.preprocess import (
    DecodeError,
    ImageTooLarge,
    display_pixels,
    read_dataset,
)
from tests import bombs, factory
from tests.peers import NodeProcess, c_store_statuses, echoscu, storescu, wait_for

pytestmark = pytest.mark.peers


@pytest.fixture
def decoder():
    decoding = Decoder(max_megapixels=40.0)
    yield decoding
    decoding.close()


def test_the_child_decodes_what_the_node_would(decoder: Decoder, tmp_path: Path) -> None:
    files = factory.write_study(tmp_path / "plain", 1) + factory.write_study(
        tmp_path / "inverted", 1, monochrome1=True)
    for path in files:
        ours = decoder.display_pixels(path)
        assert ours.dtype == np.float32
        assert np.array_equal(ours, display_pixels(read_dataset(path)))


def test_the_childs_errors_come_back_as_they_were(decoder: Decoder, tmp_path: Path) -> None:
    with pytest.raises(ImageTooLarge, match="400 megapixels"):
        decoder.display_pixels(bombs.rle_bomb(tmp_path / "rle.dcm", generate_uid()))
    (path,) = factory.write_study(tmp_path / "cut", 1)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DecodeError) as caught:
        decoder.display_pixels(path)
    assert not isinstance(caught.value, DecoderDied)
    assert decoder.display_pixels(factory.write_study(tmp_path / "ok", 1)[0]).size


def test_a_killed_decoder_costs_one_image_and_is_replaced(decoder: Decoder,
                                                          tmp_path: Path) -> None:
    (path,) = factory.write_study(tmp_path / "study", 1)
    decoder.display_pixels(path)  # started
    first = decoder.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)  # caught mid-work, then killed
    killer = threading.Timer(0.5, os.kill, (first, signal.SIGKILL))
    killer.start()
    with pytest.raises(DecoderDied, match="killed by signal SIGKILL"):
        decoder.display_pixels(path)
    killer.join()
    assert decoder.display_pixels(path).size and decoder.pid not in (None, first)


def decoder_pid(node: NodeProcess) -> int:
    """The node's decoder process (the child multiprocessing spawned; the other one
    is its resource tracker)."""
    assert node.proc is not None

    def child() -> int | None:
        tasks = Path(f"/proc/{node.proc.pid}/task")  # type: ignore[union-attr]
        pids = [int(p) for task in tasks.iterdir()
                for p in (task / "children").read_text().split()]
        decoders = [pid for pid in pids
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        return decoders[0] if len(decoders) == 1 else None
    return wait_for("the decoder process", child, 30)


def test_a_decoder_killed_in_a_study_leaves_the_node_serving(
        tmp_path: Path, untrained_bundle: Path) -> None:
    """The decoder is frozen before a two-image study arrives and killed once the
    worker waits on it: the first image is left out with the reason, the second
    decoded by a new decoder, the study done with a PARTIAL SR; echoscu answered all
    along, by the same node process."""
    node = NodeProcess(tmp_path / "node", untrained_bundle, [], quiet_period_s=1).start()
    try:
        frozen = decoder_pid(node)
        os.kill(frozen, signal.SIGSTOP)
        files = factory.write_study(tmp_path / "study", 2)
        sent = storescu(node.port, files)
        assert c_store_statuses(sent.stdout + sent.stderr) == [0, 0]
        node.wait_events("study.claimed")
        time.sleep(1)  # the worker now waits on the frozen decoder
        assert echoscu(node.port).returncode == 0
        os.kill(frozen, signal.SIGKILL)
        wait_for("the study to be done", lambda: any(
            s["state"] == "done" for s in node.status()["study_list"]), 60)
        (died,) = node.events("decoder.died")
        assert died["how"] == "killed by signal SIGKILL"
        (skipped,) = node.events("image.skipped")
        assert skipped["reason"] == "undecodable" and "decoder's process ended" in \
            skipped["error"]
        (processed,) = node.events("study.processed")
        assert processed["images"] == 1
        assert echoscu(node.port).returncode == 0
        assert decoder_pid(node) != frozen
    finally:
        node.stop()
