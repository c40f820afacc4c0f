"""The node's Prometheus metrics: what it received, refused, analysed and delivered.

Each Node owns a CollectorRegistry of its own rather than prometheus_client's global
one, so two nodes in one process (tests, a benchmark) never count into each other. The
parts that see an event count it through NodeMetrics; what the database or the engine
already knows (studies and deliveries by state, the model in service) is read when
Prometheus scrapes, so it cannot drift from the truth.

Labels are closed sets (outcomes, reasons, states, backend and model names): never a
UID, an AE title or an address, which would make a series per study or per peer.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

from fractured import log
from fractured.daemon import reports
from fractured.daemon.active_model import ActiveModel
from fractured.daemon.queue import Queue
from fractured.daemon.states import DeliveryState, StudyState
from fractured.engine.findings import DecisionLevel, ModelInfo
from fractured.engine.intended_use import ScopeReason
from fractured.engine.regions import REGION_GROUPS, Region, region_group

#: How an established association ended (audit.AssociationAudit), or that it was refused.
ASSOCIATION_OUTCOMES = ("released", "aborted", "connection_closed", "rejected")
#: What an acknowledged C-STORE did: a new instance, a replaced copy, a duplicate kept.
RECEIVED_OUTCOMES = ("new", "replaced", "kept_first")
#: What one delivery attempt came to (sender.deliver_due); taken_over: not recorded,
#: another node had taken the delivery over (Queue.record_attempt).
DELIVERY_OUTCOMES = ("done", "retry", "dead_letter", "taken_over")

#: Seconds: ONNX Runtime on 2 CPU cores takes 5-50 ms a classifier image and up to a
#: second with a detector; a GPU is faster, a large study on CPU much slower.
IMAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STUDY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Seconds from a study's last image to its last result delivered: the quiet period
#: (10 s by default) plus the queue ahead of it, up to hours when a PACS was down.
LATENCY_BUCKETS = (5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                   3600.0, 14400.0)

#: The probability's histogram edges: fine enough to see a distribution move.
PROBABILITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

_log = log.get("fractured.metrics")


class NodeMetrics:
    """Every metric of one node, in its own registry (`registry`, served at /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._associations = Counter(
            "fractured_associations", "DICOM associations by how they ended.",
            ["outcome"], registry=r)
        self._rejections = Counter(
            "fractured_association_rejections", "Association requests refused, by reason.",
            ["reason"], registry=r)
        self._received = Counter(
            "fractured_instances_received", "C-STOREs acknowledged with success, by outcome.",
            ["outcome"], registry=r)
        self._refused = Counter(
            "fractured_instances_rejected", "C-STOREs refused, by reason.",
            ["reason"], registry=r)
        self._bytes = Counter(
            "fractured_received_bytes", "Bytes of received instances written to the spool.",
            registry=r)
        model_labels = ["backend", "model", "version"]
        self._image_seconds = Histogram(
            "fractured_inference_image_seconds",
            "Inference time per image (a study's time shared by its images).",
            model_labels, buckets=IMAGE_BUCKETS, registry=r)
        self._study_seconds = Histogram(
            "fractured_inference_study_seconds", "Inference time per study.",
            model_labels, buckets=STUDY_BUCKETS, registry=r)
        self._latency = Histogram(
            "fractured_study_latency_seconds",
            "From a study's last received image to its last result delivered.",
            buckets=LATENCY_BUCKETS, registry=r)
        self._deliveries = Counter(
            "fractured_delivery_attempts", "Attempts to deliver a result object, by outcome.",
            ["outcome"], registry=r)
        # Drift: how often each region's images are flagged, and their probabilities. A
        # share far from what the model showed on validation (its card) means the images,
        # the population or the equipment changed (docs/monitoring.md has the alert).
        self._findings = Counter(
            "fractured_findings", "Images analysed, by body region and decision level.",
            ["region", "level"], registry=r)
        self._probability = Histogram(
            "fractured_finding_probability", "Fracture probability of analysed images, by "
            "body region.", ["region"], buckets=PROBABILITY_BUCKETS, registry=r)
        for region in REGION_GROUPS:
            for level in DecisionLevel:
                self._findings.labels(region, str(level))
            self._probability.labels(region)
        self._scope = Counter(
            "fractured_images_scope_checked",
            "Images checked against the model's intended use, by outcome (analysed: "
            "in_scope, not_declared, unknown_body_part, region_from_image; not: "
            "body_part_outside, under_age, region_outside, unfamiliar_image).",
            ["reason"], registry=r)
        # Known outcomes start at 0, so a rate over them exists before the first event.
        for counter, outcomes in ((self._associations, ASSOCIATION_OUTCOMES),
                                  (self._received, RECEIVED_OUTCOMES),
                                  (self._deliveries, DELIVERY_OUTCOMES),
                                  (self._scope, tuple(ScopeReason))):
            for outcome in outcomes:
                counter.labels(outcome)

    def watch(self, queue: Queue, model: ActiveModel) -> None:
        """Read the queue's states and the model in service at every scrape."""
        self.registry.register(_QueueCollector(queue))
        self.registry.register(_ModelCollector(model))

    def association_ended(self, outcome: str) -> None:
        self._associations.labels(outcome).inc()

    def association_rejected(self, reason: str) -> None:
        self._associations.labels("rejected").inc()
        self._rejections.labels(reason).inc()

    def instance_received(self, outcome: str, size: int) -> None:
        self._received.labels(outcome).inc()
        self._bytes.inc(size)

    def instance_rejected(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def inference(self, backend: str, model: ModelInfo, images: int, seconds: float) -> None:
        """One study's pipeline run: `images` images in `seconds`. The pipeline batches
        images, so each image is observed at the study's mean."""
        labels = (backend, model.name, model.version)
        self._study_seconds.labels(*labels).observe(seconds)
        per_image = self._image_seconds.labels(*labels)
        for _ in range(images):
            per_image.observe(seconds / images)

    def finding(self, region: Region | None, level: DecisionLevel,
                probability: float) -> None:
        """One analysed image: its body region (None: other), decision and probability."""
        label = region_group(region)
        self._findings.labels(label, str(level)).inc()
        self._probability.labels(label).observe(probability)

    def scope_checked(self, reason: ScopeReason) -> None:
        self._scope.labels(str(reason)).inc()

    def delivery_attempt(self, outcome: str) -> None:
        self._deliveries.labels(outcome).inc()

    def study_delivered(self, seconds: float) -> None:
        """A study's last result was delivered `seconds` after its last image arrived."""
        self._latency.observe(seconds)


class _QueueCollector:
    """Studies and deliveries by state, counted in the database at scrape time (every
    state shown, 0 included, so queue depth is always a series)."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        readable = GaugeMetricFamily(
            "fractured_queue_readable", "1 when the studies and deliveries by state could "
            "be counted at this scrape, else 0 (the node log says why).")
        try:
            counts = reports.counts(self._queue.engine)
        except Exception as exc:  # the database is failing: say so, serve the rest
            _log.error("metrics.queue_unreadable", error=str(exc))
            readable.add_metric([], 0)
            yield readable
            return
        readable.add_metric([], 1)
        yield readable
        for name, doc, states, found in (
                ("fractured_studies", "Studies in the queue, by state.", StudyState,
                 counts["studies"]),
                ("fractured_deliveries", "Result deliveries, by state.", DeliveryState,
                 counts["deliveries"])):
            gauge = GaugeMetricFamily(name, doc, labels=["state"])
            for state in states:
                gauge.add_metric([str(state)], found.get(str(state), 0))
            yield gauge


class _ModelCollector:
    """The model the worker runs now: it changes at the first study after a roll-out,
    so it is read from the ActiveModel at every scrape."""

    def __init__(self, model: ActiveModel) -> None:
        self._model = model

    def collect(self) -> Iterator[Metric]:
        pipeline = self._model.pipeline
        info = pipeline.model
        yield InfoMetricFamily(
            "fractured_active_model", "The engine bundle the worker runs (a roll-out "
            "shows once the next study starts).",
            value={"name": info.name, "version": info.version,
                   "backend": pipeline.backend_name, "trained": str(info.trained).lower()})
        rates = pipeline.bundle.manifest.classifier.expected_flag_rates
        if rates:
            expected = GaugeMetricFamily(
                "fractured_expected_flagged_share", "Share of the active model's validation "
                "images flagged, by body region and operating point (high_sensitivity: "
                "possible or likely; high_specificity: likely): what the shares of "
                "fractured_findings_total are watched against.", labels=["region", "point"])
            for region, rate in rates.items():
                expected.add_metric([region, "high_sensitivity"], rate.high_sensitivity)
                expected.add_metric([region, "high_specificity"], rate.high_specificity)
            yield expected
