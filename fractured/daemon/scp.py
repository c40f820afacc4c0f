"""The DICOM listener: C-ECHO and C-STORE service class provider (pynetdicom).

A C-STORE is answered with success only once the object is durably in the spool and
its row is committed: an acknowledged image is never lost. Everything else gets a
specific status and a log event that says why.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import NamedTuple

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
    register_uid,
    uid_to_service_class,
)

from fractured import dicom_files, log
from fractured.config import NodeSettings, Settings
from fractured.daemon import access, limits
from fractured.daemon.access import AccessPolicy
from fractured.daemon.audit import AssociationAudit
from fractured.daemon.file_meta import file_header
from fractured.daemon.intake import HeldInstance, InstanceHeld, ReceivedInstance
from fractured.daemon.metrics import NodeMetrics
from fractured.daemon.queue import Queue
from fractured.daemon.spool import incoming_path
from fractured.dicom_uids import is_uid
from fractured.durable import write_durably

# C-STORE response statuses (PS3.4 Annex B.2.3, PS3.7 Annex C).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

#: Projection X-ray storage classes the node analyses. Secondary Capture is accepted
#: because digitised and exported radiographs arrive as SC with Modality CR/DX; which
#: images are analysed is decided by [study].modalities, not by the SOP class.
ACCEPTED_SOP_CLASSES: frozenset[str] = frozenset({
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
})

_log = log.get("fractured.scp")


def build_ae(settings: Settings) -> AE:
    """An AE that negotiates every storage SOP class pynetdicom lists (its 120
    StoragePresentationContexts), those [node].extra_sop_classes adds, and every
    transfer syntax.

    Offering all storage classes lets us answer an unwanted one with a clear C-STORE
    status (0x0122) instead of a bare presentation-context rejection; offering every
    transfer syntax matters because some PACS cannot transcode (Orthanc without GDCM
    cannot decompress JPEG 2000) and send nothing if we are picky.
    """
    ae = AE(ae_title=settings.node.ae_title)
    ae.network_timeout = settings.node.network_timeout_s
    ae.acse_timeout = settings.node.network_timeout_s
    ae.dimse_timeout = settings.node.network_timeout_s
    ae.maximum_pdu_size = limits.MAXIMUM_PDU_BYTES  # and no longer PDU is read
    ae.require_called_aet = settings.access.require_called_ae_title
    ae.maximum_associations = settings.node.max_associations
    ae.add_supported_context(Verification)
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    listed = {context.abstract_syntax for context in StoragePresentationContexts}
    for uid in settings.node.extra_sop_classes:
        if uid not in listed:
            _serve_as_storage(uid)
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    return ae


def _serve_as_storage(uid: str) -> None:
    """pynetdicom aborts an association whose C-STORE names a class it does not know as
    a storage class ("no supported service class"): a vendor's private class the config
    adds is registered with its storage service first (process-wide; idempotent)."""
    if uid_to_service_class(uid) is not StorageServiceClass:
        register_uid(uid, "ExtraStorage_" + uid.replace(".", "_"), StorageServiceClass)


def handlers(node: NodeSettings, queue: Queue, policy: AccessPolicy,
             audit: AssociationAudit, metrics: NodeMetrics) -> list[tuple]:
    """Every event the listener handles: access at the request, the size of what
    arrives, then the services, and the audit trail of each association."""
    return [
        *access.handlers(policy, metrics),
        *limits.ObjectSizeLimit(node.max_object_mb << 20, metrics).handlers(),
        *audit.handlers(),
        (evt.EVT_C_ECHO, _handle_echo),
        (evt.EVT_C_STORE, _handle_store, [node, queue, audit, metrics]),
    ]


def _handle_echo(event: Event) -> int:
    _log.debug("echo", calling_ae=event.assoc.requestor.ae_title)
    return SUCCESS


class Stored(NamedTuple):
    """The answer to one C-STORE, the bytes stored, and what happened: the outcome of a
    success ("new", "replaced", "kept_first") or the reason of a refusal."""

    status: int
    size: int
    outcome: str


def _handle_store(event: Event, node: NodeSettings, queue: Queue,
                  audit: AssociationAudit, metrics: NodeMetrics) -> int:
    stored = _store(event, node, queue)
    audit.stored(event.assoc, stored.status, stored.size)
    if stored.status == SUCCESS:
        metrics.instance_received(stored.outcome, stored.size)
    else:
        metrics.instance_rejected(stored.outcome)
    return stored.status


def _store(event: Event, node: NodeSettings, queue: Queue) -> Stored:
    """Spool and record one C-STORE."""
    calling_ae = event.assoc.requestor.ae_title
    sop_class = str(event.request.AffectedSOPClassUID)
    sop_instance = str(event.request.AffectedSOPInstanceUID)
    ctx = {"calling_ae": calling_ae, "sop_instance_uid": sop_instance}
    if sop_class not in ACCEPTED_SOP_CLASSES and sop_class not in node.extra_sop_classes:
        return _rejected(SOP_CLASS_NOT_SUPPORTED, "sop_class_not_supported", ctx,
                         sop_class_uid=sop_class)
    size = event.request.DataSet.getbuffer().nbytes
    if size > node.max_object_mb << 20:  # received whole (daemon.limits), not kept
        return _rejected(OUT_OF_RESOURCES, "object_too_large", ctx, received_bytes=size,
                         limit_bytes=node.max_object_mb << 20)
    try:
        ds = _identity_elements(event)
        study_uid = str(ds.get("StudyInstanceUID", ""))
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        modality = str(ds.get("Modality", ""))
        dataset_uid = str(ds.get("SOPInstanceUID", ""))
        dataset_class = str(ds.get("SOPClassUID", ""))
    except dicom_files.InflateLimitExceeded as exc:
        return _rejected(CANNOT_UNDERSTAND, "deflated_header_too_large", ctx, error=str(exc))
    except Exception as exc:
        return _rejected(CANNOT_UNDERSTAND, "dataset_unreadable", ctx, error=str(exc))
    problem = _identity_problem(study_uid, series_uid, (dataset_uid, dataset_class),
                                (sop_instance, sop_class))
    if problem:
        return _rejected(DATASET_DOES_NOT_MATCH_SOP_CLASS, problem, ctx)

    # Copies of one instance sent at once (a PACS retrying on a second association)
    # take turns: else both would write its file and only the first's row be kept,
    # the disk holding the other's bytes.
    item = ReceivedInstance(
        study_instance_uid=study_uid, series_instance_uid=series_uid,
        sop_instance_uid=sop_instance, sop_class_uid=sop_class, modality=modality,
        path=incoming_path(node.spool_dir, study_uid, sop_instance), size=0,
        calling_ae=calling_ae)
    with _instance_turns.turn(sop_instance):
        return _spool_and_record(event, node, queue, ctx, item)


def _spool_and_record(event: Event, node: NodeSettings, queue: Queue, ctx: dict[str, str],
                      arrived: ReceivedInstance) -> Stored:
    """Write the object's file at `arrived.path` and record its row (the instance's turn
    is held; `arrived.size` is set here, from the file written)."""
    # An instance held in this study has its file at `path`: a stat, not a query, for
    # nearly every image; one held in another study surfaces when its row is inserted.
    path, study_uid = arrived.path, arrived.study_instance_uid
    existed = path.exists()
    held: HeldInstance | None = None
    if existed:
        try:
            held = queue.intake.held(arrived.sop_instance_uid)
        except Exception as exc:
            return _failed("database_error", exc, ctx)
        answer = _kept_first(held, study_uid, node, ctx)
        if answer is not None:
            return answer

    try:
        data = spooled_file(event, arrived.calling_ae)
        write_durably(path, data)
    except OSError as exc:
        return _failed("spool_unwritable", exc, ctx)
    item = replace(arrived, size=len(data))
    try:
        try:
            outcome = queue.intake.record_instance(item, unheld=held is None)
        except InstanceHeld:  # in another study, or just recorded by another node
            try:
                held = queue.intake.held(item.sop_instance_uid)
            except Exception:
                if not existed:  # written here for a study that does not hold it
                    _discard(path)
                raise
            answer = _kept_first(held, study_uid, node, ctx)
            if answer is not None:
                if held is not None and held.path != path:
                    _discard(path)
                return answer
            outcome = queue.intake.record_instance(item)
    except Exception as exc:
        # The file stays (a resend replaces it); without its row it is not acknowledged.
        return _failed("database_error", exc, ctx)
    if held is not None and held.path != path:  # "replace" moved it to another study
        held.path.unlink(missing_ok=True)
    _log.info("store.accepted", study_instance_uid=study_uid, modality=item.modality,
              bytes=len(data), outcome=outcome, **ctx)
    return Stored(SUCCESS, len(data), outcome)


class _Turns:
    """One lock per key while someone holds it: copies of one SOP instance arriving at
    once on several associations are stored one after the other."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def turn(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


_instance_turns = _Turns()


def _rejected(status: int, reason: str, ctx: dict[str, str], **details: object) -> Stored:
    """Refuse an object the node will not keep (its fault, not ours)."""
    _log.warning("store.rejected", reason=reason, **details, **ctx)
    return Stored(status, 0, reason)


def _failed(reason: str, exc: Exception, ctx: dict[str, str]) -> Stored:
    """Refuse an object the node could not keep (ours: the peer may send it again)."""
    _log.error("store.failed", reason=reason, error=str(exc), **ctx)
    return Stored(OUT_OF_RESOURCES, 0, reason)


def spooled_file(event: Event, calling_ae: str) -> bytes:
    """The received object as a DICOM file: preamble, file meta and the dataset exactly
    as it arrived (its transfer syntax, its bytes). The file meta names the calling AE
    and this node, so the file alone can be recorded again (daemon.recovery)."""
    request = event.request
    return b"".join((
        file_header(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                    str(event.context.transfer_syntax), calling_ae, event.assoc.ae.ae_title),
        event.encoded_dataset(include_meta=False)))


#: The last of the elements that identify a stored object (Series Instance UID): the
#: listener reads a dataset up to it, not the pixel data after it, which is stored as
#: received and decoded by the worker.
_LAST_IDENTITY_TAG = Tag(0x0020, 0x000E)


def _identity_elements(event: Event) -> Dataset:
    """The dataset's elements up to Series Instance UID (SOP class and instance, modality,
    study and series UIDs), read from the received stream without decoding the rest.

    pynetdicom's `event.dataset` reads the whole object, pixel data included, for the
    five elements the listener needs before it answers; a deflated one it would inflate
    whole (dicom_files).
    """
    syntax = event.context.transfer_syntax
    stream: BytesIO = event.request.DataSet
    stream.seek(0)
    if syntax.is_deflated:  # inflated only as far as the identity (a deflate bomb)
        return dicom_files.read_deflated_until(stream, _past_identity,
                                               dicom_files.HEADER_LIMIT)
    return read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian,
                        stop_when=_past_identity)


def _past_identity(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag > _LAST_IDENTITY_TAG


def _kept_first(held: HeldInstance | None, study_uid: str, node: NodeSettings,
                ctx: dict[str, str]) -> Stored | None:
    """The answer to an instance the node already holds when it keeps the first copy
    (None: store this one)."""
    if held is None or node.duplicates != "keep_first":
        return None
    if held.study_instance_uid != study_uid:
        return _rejected(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                         "sop_instance_uid_held_in_another_study", ctx,
                         study_instance_uid=study_uid,
                         held_study_instance_uid=held.study_instance_uid)
    _log.info("store.duplicate", study_instance_uid=study_uid, outcome="kept_first", **ctx)
    return Stored(SUCCESS, 0, "kept_first")


def _discard(path: Path) -> None:
    """Remove a spooled file that was not recorded, and its study folder if now empty."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other images of that study are in it
        path.parent.rmdir()


def _identity_problem(study: str, series: str, dataset: tuple[str, str],
                      request: tuple[str, str]) -> str:
    """Why the UIDs cannot identify this object (they also name files), or ''.

    `dataset` and `request` are (SOP Instance UID, SOP Class UID) as the dataset and the
    C-STORE request state them: an object that contradicts its own request is refused.
    """
    if not is_uid(study):
        return "study_instance_uid_invalid"
    if not is_uid(series):
        return "series_instance_uid_invalid"
    if not is_uid(request[0]):
        return "sop_instance_uid_invalid"
    if dataset[0] != request[0]:
        return "sop_instance_uid_mismatch"
    if dataset[1] != request[1]:
        return "sop_class_uid_mismatch"
    return ""
