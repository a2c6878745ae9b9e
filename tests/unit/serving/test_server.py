"""The critic server as an attacker or a real cluster job meets it (issue 16): authentication, slow and
oversized requests, bad token ids, and the client's timeout, retries and waiting notices."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from rlhf_kit.losses import ValueLoss
from rlhf_kit.models import TokenValueModel
from rlhf_kit.serving import CriticRewardService, CriticServer, CriticServerError, RemoteCritic, encode
from tests.conftest import make_reward_model
from tests.unit.test_ppo import fake_generation

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def service(tmp_path_factory, tokenizer):
    critic = TokenValueModel(make_reward_model(tokenizer, seed=4))
    opt = torch.optim.SGD(critic.parameters(), lr=0.1)
    return CriticRewardService(critic, opt, None, ValueLoss(0.2), make_reward_model(tokenizer, seed=3),
                               output_dir=tmp_path_factory.mktemp("served"))  # fmt: skip


@pytest.fixture(scope="module")
def batch(tokenizer):
    gen = fake_generation(tokenizer)
    return gen.sequences, gen.attention_mask, 5, gen.response_mask


def post(url: str, body: bytes = b"", headers: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_unauthenticated_calls_are_refused(service, batch, tmp_path, monkeypatch):
    seq, am, p, rmask = batch
    with CriticServer(service, auth_token=TOKEN) as server:
        for endpoint in ("/health", "/infer", "/train", "/save", "/load", "/shutdown"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                            {"Authorization": f"Basic {TOKEN}"}):  # fmt: skip
                status, text = post(server.url + endpoint, encode({"path": "."}), headers)
                assert status == 401 and text.startswith(b"unauthorized"), (endpoint, headers, text)
        # the body of an unauthenticated request is never read: a 1 GB claim is answered at once
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /train HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
            s.settimeout(5)
            assert s.recv(100).startswith(b"HTTP/1.1 401")
        with pytest.raises(CriticServerError, match=r"/health failed \(401\).*set RLHF_KIT_SERVER_TOKEN"):
            RemoteCritic(server.url, token="wrong").health()
        monkeypatch.setenv("RLHF_KIT_SERVER_TOKEN", TOKEN)  # what the PPO side reads
        remote = RemoteCritic(server.url)
        assert remote.health()["ok"]
        values, scores = remote.infer(seq, am, p, rmask)
        assert values.shape == (4, 6) and scores.shape == (4,)
        remote.shutdown()
        server._thread.join(timeout=10)
        assert not server._thread.is_alive()


def test_a_token_is_required_beyond_loopback(service):
    with pytest.raises(ValueError, match=r"listening on '0.0.0.0' \(not loopback\) needs an auth token"):
        CriticServer(service, host="0.0.0.0")
    with pytest.raises(ValueError, match="non-empty string without whitespace"):
        CriticServer(service, auth_token="two words")
    server = CriticServer(service, host="0.0.0.0", allow_unauthenticated=True)  # an explicit choice
    server.shutdown()


def test_slow_clients_are_cut_off(service):
    """Half-sent heads and bodies hold no slot past read_timeout; a real client is served meanwhile."""
    with CriticServer(service, read_timeout=0.5, max_connections=8) as server:
        addr = ("127.0.0.1", server.port)
        heads = [socket.create_connection(addr) for _ in range(12)]
        for s in heads:
            s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        bodies = [socket.create_connection(addr) for _ in range(4)]
        for s in bodies:
            s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        start = time.monotonic()
        for s in heads + bodies:
            s.settimeout(10)
            data = b"".join(iter(lambda s=s: s.recv(4096), b""))  # until the server closes it
            status = data.split(b"\r\n")[0]
            assert data == b"" or b" 408 " in status or b" 503 " in status, data  # 503: over the limit
            s.close()
        assert time.monotonic() - start < 3
        # a client under the limit right after: served
        assert RemoteCritic(server.url, retries=0).health()["ok"]
        status, text = post(server.url + "/infer", headers={"Content-Length": str(2 << 30)})
        assert status == 413 and b"over the" in text


def test_slow_body_gets_408(service):
    with CriticServer(service, read_timeout=0.3) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n01234")
            s.settimeout(5)
            reply = b"".join(iter(lambda: s.recv(4096), b""))
        assert reply.startswith(b"HTTP/1.1 408") and b"request body not received within 0.3 s" in reply


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda s, a, r: (s.clone().fill_(600), a, r),
            r"token id 600 outside the models' vocabulary \[0, 512\)",
        ),
        (lambda s, a, r: (s.clone().fill_(-1), a, r), "token id -1 outside"),
        (lambda s, a, r: (s.to(torch.int8), a, r), "sequences must be int64 or int32 token ids"),
        (lambda s, a, r: (s.float(), a, r), "sequences must be int64 or int32 token ids"),
        (lambda s, a, r: (s, torch.zeros_like(a), r), "attention_mask row 0 is all zeros"),
        (lambda s, a, r: (s, a * 2, r), "attention_mask must hold only 0 and 1"),
        (lambda s, a, r: (s, a.float(), r), "attention_mask must be int64, int32 or bool"),
        (lambda s, a, r: (s, a, r * 3), "response_mask must hold only 0 and 1"),
    ],
)
def test_bad_inputs_get_400_with_one_line(service, batch, change, message):
    seq, am, p, rmask = batch
    seq, am, rmask = change(seq, am, rmask)
    with CriticServer(service) as server:
        remote = RemoteCritic(server.url, retries=0)
        with pytest.raises(CriticServerError, match=r"/infer failed \(400\): ValueError: .*" + message) as e:
            remote.infer(seq, am, p, rmask)
        assert "\n" not in str(e.value)
        with pytest.raises(CriticServerError, match=r"/train failed \(400\): ValueError: .*" + message):
            remote.train(seq, am, rmask, torch.zeros(rmask.shape), torch.zeros(rmask.shape), p,
                         mini_batch_size=2, micro_batch_size=1)  # fmt: skip
        assert service.train_calls == 0  # nothing trained on it


def test_bad_fields_get_400(service, batch):
    seq, am, p, rmask = batch
    tensors = {"sequences": seq, "attention_mask": am, "response_mask": rmask}
    with CriticServer(service) as server:
        for meta, message in [
            ({"prompt_length": "5"}, b"field 'prompt_length' must be an integer"),
            ({"prompt_length": True}, b"field 'prompt_length' must be an integer"),
            ({"prompt_length": [5]}, b"field 'prompt_length' must be an integer"),
        ]:
            status, text = post(server.url + "/infer", encode(meta, tensors))
            assert status == 400 and message in text, text
        nan = {
            **tensors,
            "values": torch.full(rmask.shape, float("nan")),
            "returns": torch.zeros(rmask.shape),
        }
        meta = {"prompt_length": p, "mini_batch_size": 2, "micro_batch_size": 1, "ppo_epochs": 1,
                "max_grad_norm": 1.0, "seed": 0}  # fmt: skip
        status, text = post(server.url + "/train", encode(meta, nan))
        assert status == 400 and b"values holds NaN or infinite entries" in text
        status, text = post(server.url + "/save", encode({"path": "."}))
        assert status == 400 and b"saves only to 'final' or 'checkpoints/<name>'" in text
        assert not any(service.store.root.iterdir())  # nothing written, nothing deleted


def silent_server():
    """A socket that accepts connections (backlog) but never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    return s, f"http://127.0.0.1:{s.getsockname()[1]}"


def test_client_timeout_notices_and_retries(service, capsys):
    silent, url = silent_server()
    with silent:
        remote = RemoteCritic(url, timeout=0.6, retries=0, notice_every=0.2)
        with pytest.raises(TimeoutError, match=f"critic server {url} did not answer /health within 0.6 s"):
            remote.health()
        assert f"critic server {url}: still waiting for /health" in capsys.readouterr().err
        # /train is not idempotent: never repeated
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            RemoteCritic(url, timeout=0.3, retries=3, backoff=5).train(
                *[torch.zeros(1, 2, dtype=torch.long)] * 3,
                torch.zeros(1, 1),
                torch.zeros(1, 1),
                1,
                mini_batch_size=1,
                micro_batch_size=1,
            )
        assert time.monotonic() - start < 3
    # an idempotent call retries with back-off until a server that starts late answers
    server = CriticServer(service)
    port = server.port
    server.socket.close()
    late = threading.Timer(0.4, lambda: setattr(late, "server", CriticServer(service, port=port).start()))
    late.start()
    try:
        info = RemoteCritic(f"http://127.0.0.1:{port}", retries=4, backoff=0.2, notice_every=None).health()
        assert info["ok"]
        err = capsys.readouterr().err
        assert f"critic server http://127.0.0.1:{port}: /health failed" in err and "retrying in 0.2 s" in err
    finally:
        late.join()
        late.server.shutdown()


def test_messages_carry_tensors_that_share_memory():
    from rlhf_kit.serving import decode

    mask = torch.ones(2, 3, dtype=torch.long)
    meta, out = decode(encode({"a": 1}, {"values": mask.float(), "x": mask, "y": mask, "z": mask[:, 1:]}))
    assert meta == {"a": 1} and torch.equal(out["x"], mask) and torch.equal(out["y"], mask)
    assert torch.equal(out["z"], mask[:, 1:])
