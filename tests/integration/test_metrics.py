"""Metrics and health over HTTP: the counts a real run leaves in /metrics, the queue and
model read at scrape time, and /healthz naming the part that fails — on real SQLite
files, a real pynetdicom listener and a real node sending to DCMTK's storescp."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from fractured import config
from fractured.config import MetricsSettings, TlsSettings
from fractured.daemon import reports, tls
from fractured.daemon.active_model import ActiveModel
from fractured.daemon.connection import make_engine
from fractured.daemon.health import DatabaseProbe, HealthChecks, listener_problem
from fractured.daemon.intake import ReceivedInstance
from fractured.daemon.metrics import NodeMetrics
from fractured.daemon.monitoring import MonitoringServer
from fractured.daemon.queue import Queue, ResultObject
from fractured.engine.bundle import Bundle
from fractured.engine.pipeline import Pipeline
from fractured.engine.registry import Registry
from fractured.training.build import build_untrained_bundle
from tests import factory
from tests.peers import (
    NodeProcess,
    Storescp,
    echoscu,
    free_port,
    make_certificates,
    storescu,
    wait_for,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    key = (metric, frozenset(labels.items()))
    assert key in samples, f"{metric}{labels} not exposed; have: {sorted(k[0] for k in samples)}"
    return samples[key]


def scrape(metrics: NodeMetrics) -> Samples:
    return parse(generate_latest(metrics.registry).decode())


def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:port/path, errors included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as rsp:
            return rsp.status, rsp.headers["Content-Type"], rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def received(sop: str, study: str = "1.2.3") -> ReceivedInstance:
    return ReceivedInstance(study_instance_uid=study, series_instance_uid="1.2.3.1",
                            sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                            modality="CR", path=Path(f"/spool/{sop}.dcm"), size=10,
                            calling_ae="MOD")


def build_pipeline(bundle: Bundle) -> Pipeline:
    return Pipeline(bundle, backend="onnxruntime", threads=1)


# --- the metrics themselves ----------------------------------------------------------


def test_each_node_counts_in_its_own_registry() -> None:
    one, other = NodeMetrics(), NodeMetrics()
    one.association_ended("released")
    one.association_rejected("calling_ae_not_allowed")
    one.instance_received("new", 1000)
    one.instance_received("kept_first", 0)
    one.instance_rejected("sop_class_not_supported")
    one.delivery_attempt("retry")
    got = scrape(one)
    assert value(got, "fractured_associations_total", outcome="released") == 1
    assert value(got, "fractured_associations_total", outcome="rejected") == 1
    assert value(got, "fractured_associations_total", outcome="aborted") == 0
    assert value(got, "fractured_association_rejections_total",
                 reason="calling_ae_not_allowed") == 1
    assert value(got, "fractured_instances_received_total", outcome="new") == 1
    assert value(got, "fractured_instances_received_total", outcome="kept_first") == 1
    assert value(got, "fractured_instances_rejected_total",
                 reason="sop_class_not_supported") == 1
    assert value(got, "fractured_received_bytes_total") == 1000
    assert value(got, "fractured_delivery_attempts_total", outcome="retry") == 1
    untouched = scrape(other)
    assert value(untouched, "fractured_associations_total", outcome="released") == 0
    assert value(untouched, "fractured_received_bytes_total") == 0
    assert not any(m.name.startswith("fractured_") for m in REGISTRY.collect())


def test_a_study_of_n_images_is_n_image_observations_at_its_mean(
        untrained_bundle: Path) -> None:
    metrics = NodeMetrics()
    model = Bundle.load(untrained_bundle).model_info
    metrics.inference("onnxruntime", model, images=4, seconds=2.0)
    got = scrape(metrics)
    labels = {"backend": "onnxruntime", "model": model.name, "version": model.version}
    assert value(got, "fractured_inference_study_seconds_count", **labels) == 1
    assert value(got, "fractured_inference_study_seconds_sum", **labels) == 2.0
    assert value(got, "fractured_inference_image_seconds_count", **labels) == 4
    assert value(got, "fractured_inference_image_seconds_bucket", le="0.25", **labels) == 0
    assert value(got, "fractured_inference_image_seconds_bucket", le="0.5", **labels) == 4


def test_queue_depth_and_latency_come_from_the_database(tmp_path: Path,
                                                        untrained_bundle: Path) -> None:
    queue = Queue(make_engine(f"sqlite:///{tmp_path / 'q.db'}"))
    metrics = NodeMetrics()
    metrics.watch(queue, ActiveModel(untrained_bundle, build_pipeline))
    queue.intake.record_instance(received("1.1"))
    got = scrape(metrics)
    assert value(got, "fractured_queue_readable") == 1
    assert value(got, "fractured_studies", state="receiving") == 1
    assert value(got, "fractured_studies", state="ready") == 0
    assert value(got, "fractured_deliveries", state="pending") == 0
    queue.mark_ready(0)
    assert value(scrape(metrics), "fractured_studies", state="ready") == 1
    claim = queue.claim("w", 60)
    assert claim is not None
    queue.finish(claim, "w", [ResultObject("9.1", "1.2", Path("/r/9.1.dcm")),
                              ResultObject("9.2", "1.2", Path("/r/9.2.dcm"))], ["pacs"])
    got = scrape(metrics)
    assert value(got, "fractured_studies", state="delivering") == 1
    assert value(got, "fractured_deliveries", state="pending") == 2
    first, second = queue.take_due_deliveries("w", 60)
    for item in (first, second):
        queue.record_attempt(item, status=0, error=None, retry_in_s=0, max_attempts=3,
                             on_study_done=metrics.study_delivered)
    got = scrape(metrics)
    assert value(got, "fractured_studies", state="done") == 1
    assert value(got, "fractured_deliveries", state="done") == 2
    # Observed once, when the last delivery made the study DONE, not at each delivery.
    assert value(got, "fractured_study_latency_seconds_count") == 1
    with queue.engine.begin() as conn:  # the database turns bad: the scrape still works
        conn.exec_driver_sql("DROP TABLE deliveries")
    got = scrape(metrics)
    assert value(got, "fractured_queue_readable") == 0
    assert not any(name == "fractured_studies" for name, _ in got)
    assert value(got, "fractured_associations_total", outcome="released") == 0


def test_the_active_model_label_follows_a_roll_out(
        tmp_path: Path, untrained_bundle: Path) -> None:
    engines = tmp_path / "engines"
    engines.mkdir()
    shutil.copytree(untrained_bundle, engines / "a")
    build_untrained_bundle(engines / "b", version="0.0.9", input_size=96)
    registry = Registry(engines)
    registry.activate("a")
    model = ActiveModel(engines, build_pipeline)
    metrics = NodeMetrics()
    metrics.watch(Queue(make_engine(f"sqlite:///{tmp_path / 'q.db'}")), model)
    first = model.pipeline.model

    def active(samples: Samples) -> list[dict[str, str]]:
        return [dict(labels) for (name, labels), v in samples.items()
                if name == "fractured_active_model_info" and v == 1]

    assert active(scrape(metrics)) == [{"name": first.name, "version": first.version,
                                        "backend": "onnxruntime", "trained": "false"}]
    registry.activate("b")
    assert active(scrape(metrics))[0]["version"] == first.version  # until the next study
    model.current()  # the worker starts the next study
    assert active(scrape(metrics))[0]["version"] == "0.0.9"


def test_a_failed_tls_handshake_counts_as_a_rejection(tmp_path: Path) -> None:
    pki = make_certificates(tmp_path / "pki")
    context = tls.server_context(TlsSettings(enabled=True, certificate=pki.server_cert,
                                             private_key=pki.server_key))
    ae = AE("TEST")
    ae.add_supported_context(Verification)
    metrics = NodeMetrics()
    port = free_port()
    server = tls.start_server(ae, ("127.0.0.1", port), context, [], metrics, 8)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as plain:
            plain.sendall(b"\x01\x00 this is not a TLS client hello\r\n" * 8)
            plain.recv(1024)  # returns once the server answers with an alert or closes
        refused = ("fractured_association_rejections_total",
                   frozenset({("reason", "tls_handshake_failed")}))
        wait_for("the refused handshake to be counted", lambda: scrape(metrics).get(refused), 30)
        assert value(scrape(metrics), "fractured_associations_total", outcome="rejected") == 1
    finally:
        server.shutdown()


# --- health ----------------------------------------------------------------------------


def test_database_probe_names_a_missing_or_replaced_file_and_creates_nothing(
        tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    queue = Queue(make_engine(f"sqlite:///{db}"))
    queue.intake.record_instance(received("1.1"))
    probe = DatabaseProbe(queue.engine.url)
    assert probe.problem() == ""
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in tmp_path.glob("q.db*"):  # with its -wal and -shm, as a mistaken mv would
        path.rename(moved / path.name)
    assert probe.problem() == "unable to open database file"
    assert not db.exists(), "the health check must not create an empty database"
    assert reports.counts(queue.engine)["studies"] == {"receiving": 1}  # the node's own connections
    for path in moved.iterdir():
        path.rename(tmp_path / path.name)
    assert probe.problem() == ""
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a database\n" * 1000)
    os.replace(garbage, db)  # the old -wal beside it could still answer a query
    assert "was replaced while the node runs" in probe.problem()
    (tmp_path / "q.db-wal").unlink()
    (tmp_path / "q.db-shm").unlink()
    assert probe.problem() == "file is not a database"


def test_listener_check_follows_the_real_server() -> None:
    assert listener_problem(None) == "not started"
    ae = AE("TEST")
    ae.add_supported_context(Verification)
    server = tls.start_server(ae, ("127.0.0.1", free_port()), None, [], NodeMetrics(), 8)
    assert listener_problem(server) == ""
    server.shutdown()
    server.thread.join(10)
    assert listener_problem(server) == "accept thread not running"


def test_healthz_is_503_naming_the_database_and_200_again_once_it_is_back(
        tmp_path: Path, untrained_bundle: Path) -> None:
    db = tmp_path / "q.db"
    queue = Queue(make_engine(f"sqlite:///{db}"))
    ae = AE("TEST")
    ae.add_supported_context(Verification)
    metrics = NodeMetrics()
    listener = tls.start_server(ae, ("127.0.0.1", free_port()), None, [], metrics, 8)
    model = ActiveModel(untrained_bundle, build_pipeline)
    server = MonitoringServer(MetricsSettings(port=free_port()), metrics,
                              HealthChecks(lambda: listener, queue.engine.url, model))
    server.start()
    try:
        status, kind, body = get(server.port, "/healthz")
        assert (status, kind) == (200, "application/json")
        assert json.loads(body) == {"status": "ok", "failing": [],
                                    "checks": {"listener": "ok", "database": "ok",
                                               "engine": "ok"},
                                    "model": model.pipeline.model.label}
        db.rename(tmp_path / "moved.db")
        status, _, body = get(server.port, "/healthz")
        report = json.loads(body)
        assert status == 503 and report["failing"] == ["database"]
        assert report["checks"]["database"] == "unable to open database file"
        (tmp_path / "moved.db").rename(db)
        assert get(server.port, "/healthz")[0] == 200
        listener.shutdown()
        status, _, body = get(server.port, "/healthz")
        assert status == 503 and json.loads(body)["failing"] == ["listener"]
        assert get(server.port, "/nothing")[0] == 404
    finally:
        server.stop()


def test_a_metrics_port_in_use_is_a_config_error_naming_it(
        tmp_path: Path, untrained_bundle: Path) -> None:
    queue = Queue(make_engine(f"sqlite:///{tmp_path / 'q.db'}"))
    health = HealthChecks(lambda: None, queue.engine.url,
                          ActiveModel(untrained_bundle, build_pipeline))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(config.ConfigError,
                           match=rf"\[metrics\]\.port: cannot listen on 127\.0\.0\.1:{port} "
                                 r"\(Address already in use\)"):
            MonitoringServer(MetricsSettings(port=port), NodeMetrics(), health)


@pytest.mark.parametrize(("text", "message"), [
    ("[metrics]\nprot = 9112\n", r"\[metrics\]\.prot: unknown key"),
    ("[metrics]\nport = 70000\n", r"\[metrics\]\.port: a TCP port is 1-65535"),
    ('[metrics]\nenabled = "yes"\n', r"\[metrics\]\.enabled: expected true or false"),
])
def test_metrics_settings_mistakes_name_the_key(tmp_path: Path, text: str,
                                                message: str) -> None:
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.load(tmp_path / "config.toml")


@pytest.mark.slow
def test_serve_stops_when_the_metrics_port_is_taken(tmp_path: Path,
                                                    untrained_bundle: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = NodeProcess(tmp_path / "node", untrained_bundle, [],
                           metrics_port=taken.getsockname()[1])
        node.folder.mkdir(parents=True)
        node.write_config()
        proc = subprocess.run([sys.executable, "-m", "fractured", "serve", "--config",
                               str(node.config)], capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode != 0
    assert f"[metrics].port: cannot listen on 127.0.0.1:{node.metrics_port}" in proc.stderr


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.slow
def test_metrics_after_a_real_run_count_what_happened(tmp_path: Path,
                                                      untrained_bundle: Path) -> None:
    """A study of 3 images, a refused object, an unknown caller; results to storescp."""
    pacs = Storescp(tmp_path / "received").start()
    node = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "pacs", "ae_title": pacs.ae_title, "port": pacs.port}],
                       access='', sections='[[access.peers]]\nae_title = "STORESCU"\n'
                                          'addresses = ["127.0.0.1"]\n').start()
    try:
        files = factory.write_study(tmp_path / "study", 3)
        sent = storescu(node.port, files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        storescu(node.port, [factory.basic_text_sr(tmp_path / "sr.dcm")])  # 0x0122
        assert echoscu(node.port, calling="INTRUDER").returncode != 0
        node.wait_events("delivery.sent", 4, timeout=120)  # SR + 3 overlays
        node.wait_events("association.ended", 2)
        status, kind, text = get(node.metrics_port, "/metrics")
        assert status == 200 and kind.startswith("text/plain; version=0.0.4")
        got = parse(text)

        assert value(got, "fractured_instances_received_total", outcome="new") == 3
        assert value(got, "fractured_instances_rejected_total",
                     reason="sop_class_not_supported") == 1
        spooled = sum(p.stat().st_size for p in (node.folder / "spool" / "incoming")
                      .rglob("*.dcm"))
        assert value(got, "fractured_received_bytes_total") == spooled
        assert value(got, "fractured_associations_total", outcome="released") == 2
        assert value(got, "fractured_associations_total", outcome="rejected") == 1
        assert value(got, "fractured_association_rejections_total",
                     reason="calling_ae_not_allowed") == 1
        assert value(got, "fractured_delivery_attempts_total", outcome="done") == 4
        assert len(pacs.files()) == 4
        assert value(got, "fractured_delivery_attempts_total", outcome="retry") == 0
        assert value(got, "fractured_studies", state="done") == 1
        assert value(got, "fractured_studies", state="receiving") == 0
        assert value(got, "fractured_deliveries", state="pending") == 0
        (started,) = node.events("node.started")
        manifest = json.loads((untrained_bundle / "manifest.json").read_text())
        model = {"backend": started["backend"], "model": manifest["name"],
                 "version": manifest["version"]}
        assert value(got, "fractured_inference_image_seconds_count", **model) == 3
        assert value(got, "fractured_inference_study_seconds_count", **model) == 1
        assert value(got, "fractured_study_latency_seconds_count") == 1
        # DONE comes after the quiet period at the least: the clock starts at the last image.
        assert value(got, "fractured_study_latency_seconds_sum") >= node.quiet_period_s
        assert value(got, "fractured_active_model_info", name=manifest["name"],
                     version=manifest["version"], backend=started["backend"],
                     trained="false") == 1
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert study_uid not in text and "STORESCU" not in text and "INTRUDER" not in text
        (listening,) = node.events("metrics.listening")
        assert (listening["host"], listening["port"]) == ("127.0.0.1", node.metrics_port)

        assert get(node.metrics_port, "/healthz")[0] == 200
        db = node.folder / "fractured.db"
        moved = tmp_path / "moved"
        moved.mkdir()
        for path in node.folder.glob("fractured.db*"):
            path.rename(moved / path.name)
        status, _, body = get(node.metrics_port, "/healthz")
        assert status == 503 and json.loads(body)["failing"] == ["database"]
        assert not db.exists(), "the health check must not create an empty database"
        (failing,) = node.wait_events("health.failing")
        assert failing["failing"] == ["database"]
    finally:
        node.stop()
        pacs.stop()
