"""The actor job's side of the critic server: :class:`RemoteCritic` (stdlib urllib, no server stack)."""

from __future__ import annotations

import http.client
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import torch

from rlhf_kit.serving.service import _CriticAPI
from rlhf_kit.serving.wire import decode, encode

#: The environment variable both sides read the shared secret from.
TOKEN_ENV = "RLHF_KIT_SERVER_TOKEN"
#: Endpoints safe to repeat after a lost connection or a timeout (same request, same effect).
IDEMPOTENT = frozenset({"/health", "/infer", "/save", "/load"})


class CriticServerError(RuntimeError):
    """The critic server answered a request with an error (``endpoint``, HTTP ``status``)."""

    def __init__(self, message: str, endpoint: str, status: int):
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status


class _Waiting:
    """Prints ``critic server URL: still waiting for ENDPOINT (N s)`` every ``every`` seconds."""

    def __init__(self, url: str, endpoint: str, every: float | None):
        self.url, self.endpoint, self.every = url, endpoint, every
        self.done = threading.Event()

    def _run(self, start: float) -> None:
        while not self.done.wait(self.every):
            waited = time.monotonic() - start
            print(f"critic server {self.url}: still waiting for {self.endpoint} ({waited:.0f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip

    def __enter__(self) -> _Waiting:
        if self.every:
            threading.Thread(target=self._run, args=(time.monotonic(),), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()


class RemoteCritic(_CriticAPI):
    """Client of a :class:`~rlhf_kit.serving.CriticServer`, with the methods of
    :class:`~rlhf_kit.serving.CriticRewardService`.

    Tensors go over the wire from CPU; results come back on the device of the ``sequences`` sent.

    Args:
        url: ``http://host:port`` of the server.
        timeout: seconds any one socket operation of a request may wait (an unreachable server raises
            ``ConnectionError`` and a silent one ``TimeoutError``, both naming the URL; a server-side
            error raises :class:`CriticServerError`).
        token: the shared secret (``Authorization: Bearer``); None reads ``RLHF_KIT_SERVER_TOKEN``.
        retries: extra attempts for idempotent calls (``/health``, ``/infer``, ``/save``, ``/load``)
            after a lost connection, a timeout or a 503, with exponential back-off from ``backoff``
            seconds. ``/train`` and ``/shutdown`` are never repeated.
        notice_every: seconds between "still waiting" lines on stderr while a request is open (None: off).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 600.0,
        *,
        token: str | None = None,
        retries: int = 3,
        backoff: float = 1.0,
        notice_every: float | None = 30.0,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"critic server URL must start with http://, got {url!r}")
        if not timeout > 0:
            raise ValueError(f"critic server timeout must be > 0 seconds, got {timeout}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.retries, self.backoff, self.notice_every = retries, backoff, notice_every

    def _call(
        self, endpoint: str, meta: dict | None = None, tensors: dict | None = None
    ) -> tuple[dict, dict[str, torch.Tensor]]:
        body = encode(meta or {}, tensors)
        attempts = 1 + (self.retries if endpoint in IDEMPOTENT else 0)
        for attempt in range(attempts):
            try:
                with _Waiting(self.url, endpoint, self.notice_every):
                    return decode(self._post(endpoint, body))
            except (ConnectionError, TimeoutError, CriticServerError) as e:
                retry = not isinstance(e, CriticServerError) or e.status == 503
                if not retry or attempt + 1 == attempts:
                    raise
                wait = self.backoff * 2**attempt
                print(f"critic server {self.url}: {endpoint} failed ({e}); retrying in {wait:g} s "
                      f"({attempt + 1}/{attempts - 1})", file=sys.stderr, flush=True)  # fmt: skip
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _post(self, endpoint: str, body: bytes) -> bytes:
        headers = {"Content-Type": "application/octet-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + endpoint, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace").strip() or str(e.reason)
            hint = f" (set {TOKEN_ENV} to the server's token)" if e.code == 401 else ""
            raise CriticServerError(
                f"critic server {self.url}: {endpoint} failed ({e.code}): {text}{hint}", endpoint, e.code
            ) from None
        except TimeoutError as e:
            raise TimeoutError(
                f"critic server {self.url} did not answer {endpoint} within {self.timeout} s"
            ) from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise TimeoutError(
                    f"critic server {self.url} did not answer {endpoint} within {self.timeout} s"
                ) from None
            raise ConnectionError(
                f"cannot reach the critic server at {self.url} ({e.reason}); is recipes/critic_server.py "
                "running there?"
            ) from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise ConnectionError(
                f"critic server {self.url}: connection lost during {endpoint} ({e})"
            ) from None

    def health(self) -> dict[str, Any]:
        """The server's :meth:`~rlhf_kit.serving.CriticRewardService.describe` (plus ``ok``)."""
        return self._call("/health")[0]

    def infer(
        self,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_length: int,
        response_mask: torch.Tensor,
        *,
        with_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``infer`` on the server: ``values (b, n)``, ``scores (b,)`` or None."""
        _, out = self._call(
            "/infer",
            {"prompt_length": int(prompt_length), "with_scores": with_scores},
            {"sequences": sequences, "attention_mask": attention_mask, "response_mask": response_mask},
        )
        device = sequences.device
        scores = out.get("scores")
        return out["values"].to(device), scores.to(device) if scores is not None else None

    def train(
        self,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        values: torch.Tensor,
        returns: torch.Tensor,
        prompt_length: int,
        *,
        mini_batch_size: int,
        micro_batch_size: int,
        ppo_epochs: int = 1,
        max_grad_norm: float = 1.0,
        seed: int = 0,
        micro_batch_tokens: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> dict[str, float]:
        """``train`` on the server; returns its statistics. With ``world_size > 1`` this is rank
        ``rank``'s share: the call returns once every rank has sent its share and the server has made
        the one update of that global batch (the same statistics on every rank)."""
        meta = {
            "prompt_length": int(prompt_length),
            "mini_batch_size": mini_batch_size,
            "micro_batch_size": micro_batch_size,
            "micro_batch_tokens": micro_batch_tokens,
            "ppo_epochs": ppo_epochs,
            "max_grad_norm": float(max_grad_norm),
            "seed": seed,
            "rank": rank,
            "world_size": world_size,
        }
        tensors = {
            "sequences": sequences,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "values": values,
            "returns": returns,
        }
        return self._call("/train", meta, tensors)[0]

    def save(self, path: str, keep_last: int | None = None) -> str:
        """``save`` on the server (``final`` or ``checkpoints/<name>`` under its output directory);
        returns the directory written."""
        return self._call("/save", {"path": str(path), "keep_last": keep_last})[0]["path"]

    def load(self, path: str) -> int:
        """``load`` on the server; returns the restored train-call count."""
        return int(self._call("/load", {"path": str(path)})[0]["train_calls"])

    def shutdown(self) -> None:
        """Ask the server to stop serving."""
        self._call("/shutdown")


def connect_critic_server(
    url: str,
    *,
    vocab_size: int,
    total_steps: int,
    value_clip: float,
    need_scores: bool,
    timeout: float = 600.0,
    token: str | None = None,
) -> tuple[RemoteCritic, dict[str, Any]]:
    """A :class:`RemoteCritic` for ``url`` after checking with ``/health`` that the server fits this run:
    a reward model when ``need_scores``, vocabularies that hold ``vocab_size`` ids (the actor
    tokenizer's), the same LR-schedule length (``total_steps`` optimizer steps) and value clip.
    Returns the client and the server's description; raises a one-line ``ValueError`` on a mismatch.
    """
    remote = RemoteCritic(url, timeout, token=token)
    info = remote.health()
    if need_scores and not info.get("reward_model"):
        raise ValueError(
            f"critic server {url} has no reward model: start it with --reward-model or score with --reward-fn"
        )
    for key in ("critic_vocab_size", "reward_model_vocab_size"):
        if info.get(key) is not None and info[key] < vocab_size:
            raise ValueError(
                f"critic server {url}: {key} {info[key]} is smaller than the actor tokenizer's {vocab_size}"
            )
    for key, want in (("total_steps", total_steps), ("value_clip", value_clip)):
        if key in info and info[key] != want:
            flag = "--" + key.replace("_", "-")
            raise ValueError(
                f"critic server {url} has {key} {info.get(key)} but this run needs {want}: "
                f"start it with {flag} {want}"
            )
    return remote, info
