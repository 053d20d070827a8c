"""The suite stays steady: no test depends on telemetry (tests/conftest.py turns it off)."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gradio_client import Client
from huggingface_hub import constants
from huggingface_hub.utils import _telemetry


class _Recorder(BaseHTTPRequestHandler):
    paths: list[str] = []

    def do_HEAD(self):  # noqa: N802
        _Recorder.paths.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


def test_gradio_client_telemetry_never_reaches_the_hub_endpoint(monkeypatch):
    """What made tests/test_reliability_demo.py::test_http_load_model_refused flaky: a
    Client's telemetry ping, sent from a background thread to HF_ENDPOINT (the recorder)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as the demo tests do
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"  # Client starts no ping
        fake = type("FakeClient", (), {"src": "http://127.0.0.1:1/"})()
        Client._telemetry_thread(fake)  # the ping itself, were it started
        _telemetry._TELEMETRY_QUEUE.join()  # everything queued has been sent
        assert _Recorder.paths == []
    finally:
        server.shutdown()
