"""Pixel decoding in a child process, so that a decoder crash or an out-of-memory cannot
take the node (and its listener) down.

Decoding is where received bytes meet native code (JPEG 2000, JPEG-LS, RLE decoders)
and where an image's size turns into memory. The worker reads headers itself (bounded:
dicom_files) and asks a `Decoder` for each image's display pixels; the decoder's
process reads the file, decodes and windows it (engine.preprocess) and sends the
pixels back. Its address space is limited to what the largest image allowed
([engine].max_image_megapixels) can take, so a decoder that misjudges an image fails
with a MemoryError in its own process; one that crashes or is killed (the OOM killer
picks the largest process) is replaced, and the image is reported undecodable with the
reason. The model stays in the node's process: its input has a fixed size.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import signal
import struct
import threading
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import numpy as np

from fractured import log
from fractured.engine.preprocess import DecodeError, ImageTooLarge

#: The decoder process's address space: what its libraries map (about 500 MiB after
#: import) and 32 bytes a pixel of the largest image allowed (decoding and windowing
#: take about 25 at their peak).
BASE_ADDRESS_SPACE = 768 << 20
BYTES_PER_PIXEL = 32
#: Seconds a stopping node waits for the decoder to finish.
STOP_TIMEOUT_S = 5.0

_log = log.get("fractured.decoding")


class DecoderDied(DecodeError):
    """The decoder's process ended while decoding an image (a crash, the OOM killer)."""


def address_space(max_megapixels: float) -> int:
    return BASE_ADDRESS_SPACE + int(max_megapixels * 1e6) * BYTES_PER_PIXEL


class Decoder:
    """Display pixels of DICOM files, decoded in a child process (module doc). One
    decode at a time; the process starts at the first and after each death."""

    def __init__(self, max_megapixels: float) -> None:
        self.max_megapixels = max_megapixels
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the decoder's process now (it takes a second to import)."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> Connection:
        if self._process is None or not self._process.is_alive():
            context = multiprocessing.get_context("spawn")
            parent, child = context.Pipe()
            self._process = context.Process(
                target=_serve, args=(child, address_space(self.max_megapixels)),
                name="fractured-decoder", daemon=True)
            self._process.start()
            child.close()
            self._conn = parent
        assert self._conn is not None
        return self._conn

    def display_pixels(self, path: Path) -> np.ndarray:
        """engine.preprocess.display_pixels of the file at `path`, decoded in the child:
        its errors (DecodeError, ImageTooLarge) as they were raised there, DecoderDied
        when the process ended meanwhile."""
        with self._lock:
            conn = self._ensure()
            try:
                conn.send((str(path), self.max_megapixels))
                kind, payload = conn.recv()
            except (EOFError, OSError):
                return self._died(path)
        if kind == "pixels":
            rows, cols = struct.unpack("<II", payload[:8])
            return np.frombuffer(payload, np.float32, offset=8).reshape(rows, cols).copy()
        if kind == "too_large":
            raise ImageTooLarge(payload)
        raise DecodeError(payload)

    def _died(self, path: Path) -> np.ndarray:
        process = self._process
        assert process is not None
        process.join(STOP_TIMEOUT_S)
        code = process.exitcode
        self._process = self._conn = None
        how = (f"killed by signal {signal.Signals(-code).name}" if code is not None
               and code < 0 else f"exit status {code}")
        _log.error("decoder.died", how=how, file=path.name)
        raise DecoderDied(f"{path.name}: the decoder's process ended while decoding it "
                          f"({how}: a decoder crash, or out of memory)")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):  # it died already
                    self._conn.send(None)
            if self._process is not None:
                self._process.join(STOP_TIMEOUT_S)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join()
            self._process = self._conn = None


def _serve(conn: Connection, address_space_bytes: int) -> None:
    """The decoder's loop: a path and a limit in, ("pixels", rows, cols, float32 bytes)
    or an error's kind and text out; None stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops it, not a Ctrl-C
    resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes, address_space_bytes))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from fractured import privacy
    from fractured.engine.preprocess import display_pixels, read_dataset

    privacy.keep_values_out_of_logs()
    while (request := conn.recv()) is not None:
        path, max_megapixels = request
        try:
            pixels = display_pixels(read_dataset(path, max_megapixels), Path(path).name,
                                    max_megapixels)
            reply = ("pixels", struct.pack("<II", *pixels.shape)
                     + np.ascontiguousarray(pixels, np.float32).tobytes())
        except ImageTooLarge as exc:
            reply = ("too_large", str(exc))
        except MemoryError:
            reply = ("undecodable", f"{Path(path).name}: out of memory decoding it (the "
                     f"decoder may use {address_space_bytes >> 20} MiB)")
        except Exception as exc:  # DecodeError, or anything a decoder raised
            reply = ("undecodable", str(exc))
        conn.send(reply)
