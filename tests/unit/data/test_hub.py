"""Loading from the hub fails fast, in one line, when the hub is out of reach."""

from __future__ import annotations

import http.server
import socket
import threading

import datasets
import pytest
from huggingface_hub import constants

from rlhf_kit.data.hub import HubUnreachableError, hub_unreachable_reason, load_hub_dataset


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def never_called(*args, **kwargs):
    raise AssertionError("datasets.load_dataset was called although the hub is unreachable")


def test_unreachable_endpoint_fails_before_datasets_retries(monkeypatch):
    url = closed_port_url()
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", never_called)
    with pytest.raises(HubUnreachableError) as info:
        load_hub_dataset("Anthropic/hh-rlhf", probe_timeout=2.0)
    message = str(info.value)
    assert "\n" not in message and url in message and "Anthropic/hh-rlhf" in message
    assert "--source default" in message and "--source PATH" in message
    assert isinstance(info.value, ConnectionError)


def test_offline_mode_tries_the_cache_and_turns_its_error_into_one_line(monkeypatch):
    calls = []

    def offline_load(name, data_dir=None):
        calls.append((name, data_dir))
        raise ConnectionError("Couldn't reach 'x' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", closed_port_url())
    monkeypatch.setattr(datasets, "load_dataset", offline_load)
    with pytest.raises(HubUnreachableError, match=r"HF_HUB_OFFLINE=1.*--source default") as info:
        load_hub_dataset("some/set", "harmless-base")
    assert calls == [("some/set", "harmless-base")] and "\n" not in str(info.value)


def test_any_http_answer_counts_as_reachable_and_the_loader_runs(monkeypatch):
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert hub_unreachable_reason(url, timeout=5.0) is None
        assert hub_unreachable_reason(closed_port_url(), timeout=2.0) is not None
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets, "load_dataset", lambda name, data_dir=None: {"train": [name]})
        assert load_hub_dataset("a/b") == {"train": ["a/b"]}
    finally:
        server.shutdown()
        server.server_close()
