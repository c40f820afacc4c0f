"""Claims READY studies, runs the engine, writes the result objects, queues deliveries.

Results are written durably before the run is committed, and the commit that records
them also queues their deliveries: a crash at any point either repeats the whole run or
leaves a complete one, never half a set of results on the PACS.
"""

from __future__ import annotations

import functools
import io
import socket
import time
import traceback
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fractured import log
from fractured.config import Settings
from fractured.daemon.active_model import ActiveModel
from fractured.daemon.decoding import Decoder
from fractured.daemon.leases import Renewal
from fractured.daemon.metrics import NodeMetrics
from fractured.daemon.queue import ClaimedStudy, Queue, ResultObject
from fractured.daemon.routing import Router, skipped_reason
from fractured.daemon.schema import ImageOutcome, utcnow
from fractured.daemon.shadow import record as record_shadow
from fractured.dicom_files import read_header
from fractured.durable import write_durably
from fractured.engine.findings import Finding, ModelInfo, study_verdict
from fractured.engine.intended_use import NOT_DECLARED_CHECK, ScopeCheck, ScopeReason
from fractured.engine.pipeline import Pipeline
from fractured.engine.preprocess import DecodeError, ImageTooLarge
from fractured.engine.regions import Region, dataset_region, region_group
from fractured.engine.sources import image_ref
from fractured.privacy import Redactor
from fractured.results.header import header_repairs
from fractured.results.overlay import make_overlay
from fractured.results.sr import make_sr
from fractured.results.summary import make_summary

#: Series numbers of our result series, high enough not to collide with a modality's.
SR_SERIES_NUMBER = 9901
OVERLAY_SERIES_NUMBER = 9902

_log = log.get("fractured.worker")


def node_identity(settings: Settings) -> tuple[str, str]:
    """(worker id, device UID): stable across restarts of one node, distinct between nodes.

    A stable worker id lets a restarted node take back its own leases at once instead of
    waiting for them to expire; the device UID names this node in every SR.
    """
    worker = f"{socket.gethostname()}:{settings.node.ae_title}:{settings.node.port}"
    return worker, generate_uid(entropy_srcs=["fractured-device", worker])


class Worker:
    def __init__(self, settings: Settings, queue: Queue, model: ActiveModel,
                 metrics: NodeMetrics) -> None:
        self.settings = settings
        self.queue = queue
        self.model = model
        self.metrics = metrics
        self.id, self.device_uid = node_identity(settings)
        self.router = Router(settings)
        #: decodes pixels in a process of its own (daemon.decoding)
        self.decoder = Decoder(settings.engine.max_image_megapixels)

    def run_once(self) -> bool:
        """Process one study if one is ready; returns whether one was claimed."""
        claim = self.queue.claim(self.id, self.settings.worker.lease_s,
                                 self.settings.worker.max_claims)
        if claim is None:
            return False
        log_ctx = {"study_instance_uid": claim.study_instance_uid, "run": claim.run}
        _log.info("study.claimed", instances=len(claim.instances), **log_ctx)
        lease_s = self.settings.worker.lease_s
        try:
            with Renewal(lambda: self.queue.renew_study(claim, self.id, lease_s), lease_s,
                         **log_ctx):
                self._process(claim, log_ctx)
        except Exception as exc:
            redact = _redactor(claim)
            _log.error("study.failed", error=redact(f"{type(exc).__name__}: {exc}"),
                       traceback=redact(traceback.format_exc()), **log_ctx)
            self.queue.fail(claim, self.id, redact(f"processing error: {exc}"))
        return True

    def _earlier_report(self, claim: ClaimedStudy) -> list[Dataset]:
        """[the SR this run supersedes] when the study was analysed before, else []."""
        if claim.run <= 1:
            return []
        earlier = _latest_sr(self.settings.node.spool_dir / "results"
                             / claim.study_instance_uid, claim.run)
        return [earlier] if earlier is not None else []

    def _process(self, claim: ClaimedStudy, log_ctx: dict[str, object]) -> None:
        started = time.monotonic()
        # One model for the whole study, even if a roll-out happens meanwhile; its
        # intended use decides which images it may speak about.
        pipeline = self.model.current()
        sources: list[tuple[Dataset, np.ndarray]] = []
        outcomes: list[str] = []  # why images were not analysed
        outside: list[str] = []  # why, in the SR's words (intended use, decoding)
        records: list[ImageOutcome] = []  # every scope-checked image, for status
        recorded = utcnow()
        limit = self.settings.engine.max_image_megapixels
        # the study's identifying values, read once and only if an error is to be told
        redact = functools.cache(lambda: _redactor(claim))
        for instance in claim.instances:
            sop_uid, path = instance.sop_instance_uid, instance.path
            decision = self.router.decide(instance)
            if not decision.analyse:
                _log.info("image.skipped", reason="routing", outcome=decision.outcome,
                          modality=instance.modality, sop_instance_uid=sop_uid, **log_ctx)
                outcomes.append(decision.outcome)
                continue
            try:
                ds = _header(path)
                scope = pipeline.scope(ds)
                if not scope.analyse:
                    self._outside(scope, claim, sop_uid, ds, pipeline, log_ctx,
                                  outcomes, outside, records, recorded)
                    continue
                sources.append((ds, self.decoder.display_pixels(path)))
            except ImageTooLarge as exc:
                _log.warning("image.skipped", reason="too_large", error=redact()(str(exc)),
                             sop_instance_uid=sop_uid, **log_ctx)
                outcomes.append("too large to decode")
                outside.append(f"the image is larger than the {limit:g} megapixels the "
                               "node decodes")
                continue
            except DecodeError as exc:  # DecoderDied too: the next image gets a new one
                _log.warning("image.skipped", reason="undecodable", error=redact()(str(exc)),
                             sop_instance_uid=sop_uid, **log_ctx)
                outcomes.append("undecodable")
                outside.append("the image could not be decoded")
                continue
            if repairs := header_repairs(ds):
                # Attribute names and actions only: the values may be patient data.
                _log.info("source.repaired", sop_instance_uid=sop_uid,
                          attributes=[name for name, _ in repairs],
                          actions=[action for _, action in repairs], **log_ctx)
        findings: list[Finding] = []
        if sources:
            inference_started = time.monotonic()
            verdicts = pipeline.run([(image_ref(ds), pixels) for ds, pixels in sources],
                                    [ds for ds, _ in sources])
            self.metrics.inference(pipeline.backend_name, pipeline.model, len(sources),
                                   time.monotonic() - inference_started)
            analysed: list[tuple[Dataset, np.ndarray]] = []
            for finding, (ds, pixels) in zip(verdicts, sources, strict=True):
                scope = finding.scope or NOT_DECLARED_CHECK
                sop_uid = finding.image.sop_instance_uid
                if not scope.analyse:  # the region check decided: no verdict
                    self._outside(scope, claim, sop_uid, ds, pipeline, log_ctx,
                                  outcomes, outside, records, recorded)
                    continue
                if scope.reason is not ScopeReason.IN_SCOPE:  # analysed, but how
                    _log.info("image.scope", scope=str(scope.reason), detail=scope.detail,
                              sop_instance_uid=sop_uid, **log_ctx)
                self.metrics.scope_checked(scope.reason)
                region = dataset_region(ds) or scope.region
                self.metrics.finding(region, finding.level, finding.probability)
                records.append(_outcome(claim, sop_uid, recorded, pipeline.model, region,
                                        scope, finding))
                findings.append(finding)
                analysed.append((ds, pixels))
            sources = analysed
        if not findings:
            state = self.queue.finish(claim, self.id, [], [],
                                      skipped=skipped_reason(outcomes), outcomes=records)
            _log.info("study.skipped", state=str(state), **log_ctx)
            return
        datasets = [ds for ds, _ in sources]
        sr = make_sr(findings, datasets, series_instance_uid=generate_uid(),
                     series_number=SR_SERIES_NUMBER, device_uid=self.device_uid,
                     predecessors=self._earlier_report(claim), not_analysed=outside)
        overlay_series = generate_uid()
        overlays = [
            make_overlay(finding, ds, series_instance_uid=overlay_series,
                         series_number=OVERLAY_SERIES_NUMBER, instance_number=i,
                         max_size=self.settings.results.overlay_max_size,
                         colormap=self.settings.results.colormap, display=pixels,
                         study=study_verdict(findings) if i == 1 else None)
            for i, (finding, (ds, pixels)) in enumerate(zip(findings, sources, strict=True),
                                                        start=1)
        ]
        if self.settings.results.summary_image:
            overlays.append(make_summary(
                findings, datasets, [pixels for _, pixels in sources],
                series_instance_uid=overlay_series, series_number=OVERLAY_SERIES_NUMBER,
                instance_number=len(overlays) + 1,
                max_size=self.settings.results.overlay_max_size,
                colormap=self.settings.results.colormap))
        run_dir = (self.settings.node.spool_dir / "results" / claim.study_instance_uid
                   / str(claim.run))
        results = [_write(run_dir, obj) for obj in (sr, *overlays)]
        state = self.queue.finish(claim, self.id, results,
                                  [d.name for d in self.settings.destinations],
                                  outcomes=records)
        if state is None:
            _log.warning("study.lease_lost", detail="another worker took the study over; "
                         "its run counts", **log_ctx)
            return
        write_durably(run_dir / COMMITTED, b"")  # these results are the study's (see _latest_sr)
        _log.info("study.processed", state=str(state), images=len(findings),
                  fractures=sum(f.fracture for f in findings),
                  boxes=sum(len(f.boxes) for f in findings), model=findings[0].model.label,
                  backend=pipeline.backend_name, objects=len(results),
                  seconds=round(time.monotonic() - started, 3), **log_ctx)
        self._shadow(claim, sources, findings, log_ctx)

    def _outside(self, scope: ScopeCheck, claim: ClaimedStudy, sop_uid: str, ds: Dataset,
                 pipeline: Pipeline, log_ctx: dict[str, object], outcomes: list[str],
                 outside: list[str], records: list[ImageOutcome], recorded: datetime) -> None:
        """Record an image outside the intended use: counted, logged with the reason,
        named in the SR and in status, and given no verdict."""
        self.metrics.scope_checked(scope.reason)
        _log.info("image.skipped", reason="intended_use", scope=str(scope.reason),
                  detail=scope.detail, sop_instance_uid=sop_uid, **log_ctx)
        outcomes.append(f"outside the intended use ({scope.detail})")
        outside.append(scope.detail)
        records.append(_outcome(claim, sop_uid, recorded, pipeline.model,
                                dataset_region(ds) or scope.region, scope))

    def _shadow(self, claim: ClaimedStudy, sources: list[tuple[Dataset, np.ndarray]],
                findings: list[Finding], log_ctx: dict[str, object]) -> None:
        """Run the shadow model, if any, on the study just delivered; store, never send."""
        shadow = self.model.shadow()
        if shadow is None:
            return
        started = time.monotonic()
        try:
            candidate = shadow.run(
                [(f.image, pixels) for f, (_, pixels) in zip(findings, sources, strict=True)],
                [ds for ds, _ in sources])
            rows = record_shadow(self.queue, claim.run, findings, candidate)
        except Exception as exc:  # the study is done and delivered: never fail it now
            redact = _redactor(claim)
            _log.error("shadow.failed", model=shadow.model.label,
                       error=redact(f"{type(exc).__name__}: {exc}"),
                       traceback=redact(traceback.format_exc()), **log_ctx)
            return
        _log.info("shadow.processed", model=shadow.model.label, images=rows,
                  fractures=sum(f.fracture for f in candidate),
                  seconds=round(time.monotonic() - started, 3), **log_ctx)


def _header(path: Path) -> Dataset:
    """An image's header, its pixel data left to the decoder; DecodeError naming the
    file when it is not DICOM (or deflated past what a header may be)."""
    try:
        return read_header(path)
    except Exception as exc:  # pydicom raises several types for a bad file
        raise DecodeError(f"{path.name}: not a readable DICOM file ({exc})") from exc


def _redactor(claim: ClaimedStudy) -> Redactor:
    """A Redactor of the study's identifying values, for a text about an error (read
    when one is to be told: errors are rare, headers are read in a millisecond)."""
    headers = []
    for instance in claim.instances:
        try:
            headers.append(read_header(instance.path))
        except Exception:
            continue
    return Redactor.of(headers)


def _outcome(claim: ClaimedStudy, sop_uid: str, recorded: datetime, model: ModelInfo,
             region: Region | None, scope: ScopeCheck,
             finding: Finding | None = None) -> ImageOutcome:
    """The status record of one scope-checked image: its finding's level and
    probability, or none where it was not analysed."""
    return ImageOutcome(
        study_instance_uid=claim.study_instance_uid, sop_instance_uid=sop_uid,
        run=claim.run, recorded_at=recorded, model=model.label,
        region=region_group(region), scope=str(scope.reason),
        level=str(finding.level) if finding is not None else None,
        probability=float(finding.probability) if finding is not None else None)


#: Marker file of a run folder whose results were committed (queue.finish) as the study's.
COMMITTED = "committed"


def _latest_sr(study_results: Path, before_run: int) -> Dataset | None:
    """The SR of the latest earlier committed run still in the spool, if any (a run a
    crash cut before its commit was never sent, so it is nobody's predecessor)."""
    runs = sorted((int(p.name) for p in study_results.glob("*")
                   if p.name.isdigit() and int(p.name) < before_run
                   and (p / COMMITTED).is_file()), reverse=True)
    for run in runs:
        for path in sorted((study_results / str(run)).glob("*.dcm")):
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # a result file cut by a crash: look further back
                continue
            if ds.get("Modality") == "SR":
                return ds
    return None


def _write(folder: Path, ds: Dataset) -> ResultObject:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    write_durably(path, buffer.getvalue())
    return ResultObject(str(ds.SOPInstanceUID), str(ds.SOPClassUID), path)
