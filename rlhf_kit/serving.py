"""The critic and the reward model served from a separate job, as NeMo-Aligner's critic server does.

The actor job keeps the actor and the reference; a server job holds the critic (with its optimizer and
LR schedule) and the reward model. Per PPO step the actor job sends::

    make_experience(..., remote=client)       POST /infer   values (b, n) and RM scores (b,)
    ppo_update(..., UpdateConfig(train_critic=False))       actor-only update, locally
    client.train_rollout(rollout, cfg, seed)  POST /train   the critic half of ppo_update, on the server
    client.save(path) / client.load(path)     POST /save, /load   exact-resume state, next to the actor's

The server trains with :func:`rlhf_kit.ppo.ppo_update` itself (critic-only), on a
:class:`~rlhf_kit.rollout.RolloutBuffer` seeded like the actor job's, so the critic ends with the
weights a local run gives.

Wire format (both directions): an 8-byte little-endian length, a UTF-8 JSON object of scalars, then
``safetensors`` bytes of the tensors. Errors come back as HTTP 400 (bad request) or 500 with a one-line
text body, which :class:`RemoteCritic` raises as :class:`CriticServerError` naming the endpoint.
HTTP only, no authentication: run it on a trusted network, one actor job per server.
"""

from __future__ import annotations

import http.client
import json
import math
import shutil
import socket
import struct
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from contextlib import nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from rlhf_kit.losses import ValueLoss
from rlhf_kit.models.reward import reward_scores
from rlhf_kit.models.value import response_values
from rlhf_kit.rollout import Rollout, RolloutBuffer

#: Marks a directory written by :meth:`CriticRewardService.save`.
MARKER = "critic_server.json"


# ------------------------------------------------------------------------------------------- checks
def _check_batch(
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    response_mask: torch.Tensor,
    **per_token: torch.Tensor,
) -> None:
    """Raise a one-line ``ValueError`` naming the field when the shapes of a rollout batch disagree."""
    if sequences.dim() != 2 or sequences.dtype.is_floating_point:
        shape = tuple(sequences.shape)
        raise ValueError(
            f"sequences must be integer token ids of shape (b, p + n), got {sequences.dtype} {shape}"
        )
    if tuple(attention_mask.shape) != tuple(sequences.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, sequences {tuple(sequences.shape)}"
        )
    b, t = sequences.shape
    if response_mask.dim() != 2 or response_mask.shape[0] != b:
        shape = tuple(response_mask.shape)
        raise ValueError(f"response_mask must be (b, n) with b = {b} rows like sequences, got {shape}")
    n = response_mask.shape[1]
    if prompt_length < 1 or prompt_length + n != t:
        raise ValueError(f"prompt_length {prompt_length} + response_mask width {n} != sequences width {t}")
    for name, x in per_token.items():
        if tuple(x.shape) != (b, n):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {(b, n)} like response_mask")


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


class _CriticAPI:
    """What the service and its client share: :meth:`train_rollout` on top of ``train``."""

    def train(self, *args, **kwargs) -> dict[str, float]:  # pragma: no cover - overridden
        raise NotImplementedError

    def train_rollout(self, rollout: Rollout, cfg, seed: int) -> dict[str, float]:
        """:meth:`train` on a :class:`Rollout` with an :class:`rlhf_kit.ppo.UpdateConfig`'s batch sizes,
        epochs and clipping; ``seed`` is the actor job's ``RolloutBuffer`` seed (same mini-batch order)."""
        return self.train(
            rollout.sequences,
            rollout.attention_mask,
            rollout.response_mask,
            rollout.values,
            rollout.returns,
            rollout.prompt_length,
            mini_batch_size=cfg.mini_batch_size,
            micro_batch_size=cfg.micro_batch_size,
            ppo_epochs=cfg.ppo_epochs,
            max_grad_norm=cfg.max_grad_norm,
            seed=seed,
        )


# ------------------------------------------------------------------------------------------ service
class CriticRewardService(_CriticAPI):
    """The critic (trained) and the reward model (frozen, optional) behind one object.

    Args:
        critic: a :class:`rlhf_kit.models.TokenValueModel` on ``device``.
        optimizer: the critic's optimizer; ``scheduler`` its LR schedule (stepped once per optimizer
            step, after each :meth:`train` call, as the PPO recipe steps its local schedule).
        value_loss: the clipped value loss (default ``ValueLoss(0.2)``).
        reward_model: scores in :meth:`infer`; None when the reward is computed elsewhere.
        device: where the models live; inputs are moved there, outputs come back on CPU.
        infer_micro_batch_size: most rows per forward in :meth:`infer`.
        autocast_dtype: e.g. ``torch.bfloat16`` for mixed precision; None runs in the weights' dtype.
        tokenizer: saved with the critic's HF directory (optional).
        output_dir: relative paths given to :meth:`save` / :meth:`load` resolve against it.
        info: extra entries for :meth:`describe` (e.g. ``total_steps``, ``reward_stats``).
    """

    def __init__(
        self,
        critic: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        value_loss: ValueLoss | None = None,
        reward_model: nn.Module | None = None,
        *,
        device: torch.device | str = "cpu",
        infer_micro_batch_size: int = 8,
        autocast_dtype: torch.dtype | None = None,
        tokenizer: Any = None,
        output_dir: str | Path | None = None,
        info: dict[str, Any] | None = None,
    ):
        _check_positive(infer_micro_batch_size=infer_micro_batch_size)
        self.critic = critic
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.value_loss = value_loss if value_loss is not None else ValueLoss(0.2)
        self.reward_model = reward_model
        self.device = torch.device(device)
        self.infer_micro_batch_size = infer_micro_batch_size
        self.autocast_dtype = autocast_dtype
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.info = dict(info or {})
        self.train_calls = 0
        """Completed :meth:`train` calls (restored by :meth:`load`)."""

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _resolve(self, path: str | Path) -> Path:
        path = Path(path)
        if not path.is_absolute() and self.output_dir is not None:
            path = self.output_dir / path
        return path

    def describe(self) -> dict[str, Any]:
        """JSON-able facts a client checks before using the server (``/health`` returns them)."""
        rm = self.reward_model
        return {
            "reward_model": rm is not None,
            "critic_vocab_size": int(self.critic.config.vocab_size),
            "reward_model_vocab_size": int(rm.config.vocab_size) if rm is not None else None,
            "value_clip": float(self.value_loss.clip),
            "train_calls": self.train_calls,
            **self.info,
        }

    @torch.no_grad()
    def infer(
        self,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_length: int,
        response_mask: torch.Tensor,
        *,
        with_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Critic values and reward-model scores of one batch, in micro-batches, without gradients.

        Args:
            sequences, attention_mask: ``(b, p + n)`` left-padded prompts then right-padded responses.
            prompt_length: ``p``. response_mask: ``(b, n)`` (checked against the widths).
            with_scores: False skips the reward model.

        Returns:
            ``values (b, n)`` float32 (:func:`rlhf_kit.models.response_values`, not masked) and
            ``scores (b,)`` float32 (:func:`rlhf_kit.models.reward_scores`), or None without a reward
            model or with ``with_scores=False``. On CPU.
        """
        _check_batch(sequences, attention_mask, prompt_length, response_mask)
        score = with_scores and self.reward_model is not None
        values, scores = [], []
        for s in range(0, sequences.shape[0], self.infer_micro_batch_size):
            seq = sequences[s : s + self.infer_micro_batch_size].to(self.device)
            am = attention_mask[s : s + self.infer_micro_batch_size].to(self.device)
            with self._autocast():
                values.append(response_values(self.critic, seq, am, prompt_length).float().cpu())
                if score:
                    scores.append(reward_scores(self.reward_model, seq, am).cpu())
        return torch.cat(values), torch.cat(scores) if score else None

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
    ) -> dict[str, float]:
        """One critic update on a rollout: exactly the critic half of :func:`rlhf_kit.ppo.ppo_update`.

        Args:
            sequences, attention_mask: ``(b, p + n)``; response_mask, values (old values), returns:
                ``(b, n)``; prompt_length: ``p``.
            mini_batch_size: samples per optimizer step; micro_batch_size: samples per forward/backward.
            ppo_epochs: passes over the rollout; max_grad_norm: gradient clipping.
            seed: the seed of the actor job's ``RolloutBuffer`` (mini-batches come in the same order).

        Returns ``value/loss``, ``value/clip_fraction``, ``value/mean``, ``value/grad_norm`` (as
        ``ppo_update`` averages them) and ``lr/critic`` after the schedule's steps.
        """
        from rlhf_kit.ppo import ExperienceConfig, UpdateConfig, ppo_update

        _check_batch(sequences, attention_mask, prompt_length, response_mask, values=values, returns=returns)
        _check_positive(
            mini_batch_size=mini_batch_size, micro_batch_size=micro_batch_size, ppo_epochs=ppo_epochs
        )
        b = sequences.shape[0]
        zeros = torch.zeros(response_mask.shape)
        rollout = Rollout(  # the fields the actor's loss would read stay zero: only the critic trains here
            sequences=sequences,
            attention_mask=attention_mask,
            response_mask=response_mask,
            logprobs=zeros,
            ref_logprobs=zeros,
            values=values.float(),
            rewards=zeros,
            advantages=zeros,
            returns=returns.float(),
            scores=torch.zeros(b),
            finished=torch.ones(b, dtype=torch.bool),
        )
        buffer = RolloutBuffer(seed=seed)
        buffer.set_data(rollout)
        cfg = UpdateConfig(
            mini_batch_size=mini_batch_size,
            micro_batch_size=micro_batch_size,
            ppo_epochs=ppo_epochs,
            max_grad_norm=max_grad_norm,
            train_actor=False,
            train_critic=True,
        )
        self.critic.train()
        with self._autocast():
            stats = ppo_update(
                None, self.critic, None, self.optimizer, buffer, None, self.value_loss, cfg,
                ExperienceConfig(), device=self.device,
            )  # fmt: skip
        if self.scheduler is not None:
            for _ in range(ppo_epochs * math.ceil(b / mini_batch_size)):
                self.scheduler.step()
        self.train_calls += 1
        stats["lr/critic"] = float(self.optimizer.param_groups[0]["lr"])
        return stats

    def save(self, path: str | Path, keep_last: int | None = None) -> str:
        """Write ``path/critic`` (a standard HF sequence-classification directory, tokenizer included)
        and ``path/state`` (an exact-resume checkpoint: weights, optimizer, scheduler, RNG, train calls),
        atomically. With ``keep_last``, sibling directories written by ``save`` beyond the newest
        ``keep_last`` are deleted. Returns the directory written."""
        from rlhf_kit.training.checkpoint import save_checkpoint
        from rlhf_kit.training.hf import save_hf_model

        path = self._resolve(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf_model(getattr(self.critic, "model", self.critic), tmp / "critic", self.tokenizer)
        save_checkpoint(
            tmp / "state",
            self.train_calls,
            models={"critic": self.critic},
            optimizers={"critic": self.optimizer},
            schedulers={"critic": self.scheduler} if self.scheduler is not None else None,
            extra={"train_calls": self.train_calls},
        )
        (tmp / MARKER).write_text(json.dumps({"train_calls": self.train_calls, "time": time.time()}))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.replace(old)
            tmp.replace(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(path)
        if keep_last is not None and keep_last > 0:
            saved = [p for p in path.parent.iterdir() if (p / MARKER).is_file() and p != path]
            saved.sort(key=lambda p: (json.loads((p / MARKER).read_text())["train_calls"], p.name))
            for old_dir in saved[: max(0, len(saved) + 1 - keep_last)]:
                shutil.rmtree(old_dir, ignore_errors=True)
        return str(path)

    def load(self, path: str | Path) -> int:
        """Restore what :meth:`save` wrote at ``path``; returns the restored train-call count."""
        from rlhf_kit.training.checkpoint import load_checkpoint

        path = self._resolve(path)
        if not (path / MARKER).is_file():
            raise ValueError(f"no critic server checkpoint at {path} (no {MARKER})")
        _, extra = load_checkpoint(
            path / "state",
            models={"critic": self.critic},
            optimizers={"critic": self.optimizer},
            schedulers={"critic": self.scheduler} if self.scheduler is not None else None,
        )
        self.train_calls = int(extra["train_calls"])
        return self.train_calls


# ------------------------------------------------------------------------------------------ wire format
def encode(meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """``meta`` (JSON scalars) and ``tensors`` as one message: length, JSON, safetensors bytes."""
    head = json.dumps(meta).encode()
    body = save_tensors({k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()})
    return struct.pack("<Q", len(head)) + head + body


def decode(message: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Inverse of :func:`encode`; raises ``ValueError`` on a malformed message."""
    if len(message) < 8:
        raise ValueError(f"message of {len(message)} bytes is shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", message[:8])
    if 8 + n > len(message):
        raise ValueError(f"message header claims {n} bytes of JSON but only {len(message) - 8} follow")
    try:
        meta = json.loads(message[8 : 8 + n])
        tensors = load_tensors(message[8 + n :])
    except Exception as e:  # json / safetensors errors of a corrupt body
        raise ValueError(f"malformed message: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError("malformed message: the JSON header is not an object")
    return meta, tensors


def _field(mapping: dict, name: str, kind: str):
    if name not in mapping:
        raise ValueError(f"request has no {kind} {name!r}")
    return mapping[name]


# ----------------------------------------------------------------------------------------- HTTP server
class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _reply(self, status: int, body: bytes, content_type: str = "application/octet-stream") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, encode({"ok": True, **self.server.service.describe()}))
        else:
            self._reply(404, f"no GET endpoint {self.path} (GET /health)".encode(), "text/plain")

    def do_POST(self) -> None:
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            meta, tensors = decode(body) if body else ({}, {})
            if self.path == "/health":
                out = {"ok": True, **self.server.service.describe()}, {}
            elif self.path == "/shutdown":
                self._reply(200, encode({"ok": True}))  # answer first: the process may exit right after
                threading.Thread(target=self.server.shutdown, daemon=True).start()
                return
            else:
                with self.server.lock:  # one model request at a time
                    out = self.server.dispatch(self.path, meta, tensors)
            self._reply(200, encode(*out))
        except ValueError as e:  # a bad request: shapes, missing fields, malformed body, bad path
            self._error(400, e)
        except Exception as e:  # a server-side failure: full traceback in the server's log
            traceback.print_exc(file=sys.stderr)
            self._error(500, e)

    def _error(self, status: int, e: Exception) -> None:
        lines = str(e).strip().splitlines()
        text = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        self._reply(status, text.encode(), "text/plain; charset=utf-8")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, service: CriticRewardService, verbose: bool):
        super().__init__(address, _Handler)
        self.service = service
        self.lock = threading.Lock()
        self.verbose = verbose

    def dispatch(self, endpoint: str, meta: dict, tensors: dict) -> tuple[dict, dict]:
        svc = self.service
        if endpoint == "/infer":
            values, scores = svc.infer(
                _field(tensors, "sequences", "tensor"),
                _field(tensors, "attention_mask", "tensor"),
                int(_field(meta, "prompt_length", "field")),
                _field(tensors, "response_mask", "tensor"),
                with_scores=bool(meta.get("with_scores", True)),
            )
            return {}, {"values": values, **({"scores": scores} if scores is not None else {})}
        if endpoint == "/train":
            names = ("sequences", "attention_mask", "response_mask", "values", "returns")
            args = [_field(tensors, n, "tensor") for n in names]
            knobs = ("mini_batch_size", "micro_batch_size", "ppo_epochs", "seed")
            kwargs = {k: int(_field(meta, k, "field")) for k in knobs}
            kwargs["max_grad_norm"] = float(_field(meta, "max_grad_norm", "field"))
            return svc.train(*args, int(_field(meta, "prompt_length", "field")), **kwargs), {}
        if endpoint == "/save":
            return {"path": svc.save(_request_path(meta), meta.get("keep_last"))}, {}
        if endpoint == "/load":
            return {"train_calls": svc.load(_request_path(meta))}, {}
        raise ValueError(
            f"unknown endpoint {endpoint} (POST /infer, /train, /save, /load, /health, /shutdown)"
        )


def _request_path(meta: dict) -> str:
    """A ``/save`` or ``/load`` path from a request: relative and inside the server's output dir, so a
    client cannot write or prune directories elsewhere on the server's machine."""
    path = Path(str(_field(meta, "path", "field")))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"path {str(path)!r}: requests may only name paths inside the server's --output-dir")
    return str(path)


class CriticServer:
    """HTTP front of a :class:`CriticRewardService` (stdlib ``ThreadingHTTPServer``; requests that touch
    the models run one at a time under a lock). Endpoints: ``/infer``, ``/train``, ``/save``, ``/load``,
    ``/health`` (GET or POST) and ``/shutdown``. ``port=0`` picks a free port (see :attr:`url`).
    """

    def __init__(
        self, service: CriticRewardService, host: str = "127.0.0.1", port: int = 0, verbose: bool = False
    ):
        self.service = service
        self.httpd = _HTTPServer((host, port), service, verbose)
        self.host = host
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = socket.gethostname() if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` or a ``/shutdown`` request; the socket is closed on return."""
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    def start(self) -> CriticServer:
        """Serve from a background daemon thread (tests, notebooks); returns ``self``."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the background thread started by :meth:`start` and close the socket."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> CriticServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


# ------------------------------------------------------------------------------------------ client
class CriticServerError(RuntimeError):
    """The critic server answered a request with an error (``endpoint``, HTTP ``status``)."""

    def __init__(self, message: str, endpoint: str, status: int):
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status


class RemoteCritic(_CriticAPI):
    """Client of a :class:`CriticServer`, with the methods of :class:`CriticRewardService` (urllib).

    Tensors go over the wire from CPU; results come back on the device of the ``sequences`` sent.
    ``timeout`` (seconds) bounds every request; an unreachable server raises ``ConnectionError`` and a
    slow one ``TimeoutError``, both naming the URL; a server-side error raises :class:`CriticServerError`.
    """

    def __init__(self, url: str, timeout: float = 600.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"critic server URL must start with http://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(
        self, endpoint: str, meta: dict | None = None, tensors: dict | None = None
    ) -> tuple[dict, dict[str, torch.Tensor]]:
        request = urllib.request.Request(
            self.url + endpoint,
            data=encode(meta or {}, tensors),
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace").strip() or str(e.reason)
            raise CriticServerError(
                f"critic server {self.url}: {endpoint} failed ({e.code}): {text}", endpoint, e.code
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
        return decode(body)

    def health(self) -> dict[str, Any]:
        """The server's :meth:`CriticRewardService.describe` (plus ``ok``)."""
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
        """:meth:`CriticRewardService.infer` on the server: ``values (b, n)``, ``scores (b,)`` or None."""
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
    ) -> dict[str, float]:
        """:meth:`CriticRewardService.train` on the server; returns its statistics."""
        meta = {
            "prompt_length": int(prompt_length),
            "mini_batch_size": mini_batch_size,
            "micro_batch_size": micro_batch_size,
            "ppo_epochs": ppo_epochs,
            "max_grad_norm": float(max_grad_norm),
            "seed": seed,
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
        """:meth:`CriticRewardService.save` on the server (``path`` on its filesystem; relative paths
        resolve against its output directory); returns the directory written."""
        return self._call("/save", {"path": str(path), "keep_last": keep_last})[0]["path"]

    def load(self, path: str) -> int:
        """:meth:`CriticRewardService.load` on the server; returns the restored train-call count."""
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
) -> tuple[RemoteCritic, dict[str, Any]]:
    """A :class:`RemoteCritic` for ``url`` after checking with ``/health`` that the server fits this run:
    a reward model when ``need_scores``, vocabularies that hold ``vocab_size`` ids (the actor
    tokenizer's), the same LR-schedule length (``total_steps`` optimizer steps) and value clip.
    Returns the client and the server's description; raises a one-line ``ValueError`` on a mismatch.
    """
    remote = RemoteCritic(url, timeout)
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
