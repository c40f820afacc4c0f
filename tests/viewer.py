"""The web viewers a radiologist reads the results in, started by the tests like the
DICOM peers: the OHIF viewer (the built app of the npm package `@ohif/app`, put in
.cache/ohif-app by tools/install_ohif.py) served from the same origin as a proxy to
Orthanc's DICOMweb plugin, and Debian's Chromium, headless, driven by Selenium through
Debian's chromedriver. Nothing is fetched at run time; what is absent skips the test, saying so.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.paths import REPO
from tests.peers import wait_for

#: The OHIF release the tests read results in: tools/install_ohif.py pins it.
OHIF_APP = REPO / ".cache" / "ohif-app"

#: OHIF's configuration: one DICOMweb source on this origin, the proxy to Orthanc.
#: Orthanc's DICOMweb plugin answers QIDO without includefield and renders no
#: thumbnails of its own, so both come from WADO-RS frames.
APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  // No onboarding tour over the viewport: it would catch the test's clicks.
  customizationService: { 'ohif.tours': { $set: [] } },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test PACS)',
      name: 'orthanc',
      wadoUriRoot: '/wado',
      qidoRoot: '/dicom-web',
      wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video',
      bulkDataURI: { enabled: true },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""

_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".json": "application/json", ".wasm": "application/wasm",
          ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon",
          ".woff2": "font/woff2", ".woff": "font/woff"}


def ohif_dist() -> Path:
    """The built OHIF app, or skip saying how to install it."""
    dist = OHIF_APP / "dist"
    if not (dist / "index.html").exists():
        pytest.skip(f"OHIF is not installed in {OHIF_APP} (tools/setup.sh installs it)")
    return dist


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a page load is hundreds of requests."""

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith(("/dicom-web/", "/wado")):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, "text/javascript", APP_CONFIG.encode())
        else:
            file = (self.server.dist / path.lstrip("/")).resolve()
            if not file.is_file() or self.server.dist not in file.parents:
                file = self.server.dist / "index.html"  # the app's own routes
            self._send(200, _TYPES.get(file.suffix, "application/octet-stream"),
                       file.read_bytes())

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() in ("accept", "content-type", "host")}
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port,
                                              timeout=120)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            self._send(answer.status, answer.getheader("Content-Type", ""), data)
        finally:
            upstream.close()

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class ViewerServer(ThreadingHTTPServer):
    """OHIF's files and, on the same origin (no CORS), Orthanc's DICOMweb root."""

    daemon_threads = True

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.orthanc_port = orthanc_port
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def __enter__(self) -> ViewerServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


def _system(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install {package})")
    return path


@contextmanager
def chromium(width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """Debian's Chromium, headless, software WebGL (OHIF renders with WebGL), driven
    through Debian's chromedriver: same version, and Selenium is told not to fetch one."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary = _system("chromium", "chromium")
    driver_path = _system("chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                     "--no-first-run", "--disable-extensions",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def versions(driver: Any) -> dict[str, str]:
    """What the test ran in, for its output."""
    return {"ohif": json.loads((OHIF_APP / "package.json").read_text())["version"],
            "chromium": driver.capabilities.get("browserVersion", "?"),
            "chromedriver": driver.capabilities.get("chrome", {})
            .get("chromedriverVersion", "?").split(" ")[0]}


def page_state(driver: Any, script: str, what: str, timeout: float = 120.0) -> Any:
    """Poll a JavaScript expression over the page's own state until it is truthy."""
    return wait_for(what, lambda: driver.execute_script(f"try {{ return {script}; }} "
                                                        "catch (e) { return null; }"),
                    timeout, 0.5)
