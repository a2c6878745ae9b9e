"""HTTP front of a :class:`~rlhf_kit.serving.CriticRewardService`: starlette on uvicorn (``[server]`` extra).

What the server enforces (threat model: docs/server.md):

* **Authentication**: with an ``auth_token``, every request needs ``Authorization: Bearer <token>``
  (compared with :func:`hmac.compare_digest`), else 401 before the body is read. A server bound to
  anything but loopback refuses to start without a token unless ``allow_unauthenticated``.
* **Limits**: request headers must arrive within ``read_timeout`` of connecting (or of the previous
  response), the body within ``read_timeout`` of the headers (else 408 and the connection is closed),
  at most ``max_body_bytes`` (413), at most ``max_connections`` open at once (503 past it); idle
  keep-alive connections close after ``idle_timeout``. Model work runs on one worker thread, in order.
* **Global batches**: ``/train`` from an actor job of ``world_size`` ranks waits until every rank has
  sent its share (at most ``gather_timeout``, else 504 to all), then trains once
  (:meth:`~rlhf_kit.serving.CriticRewardService.train_shares`) and answers every rank the same.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rlhf_kit.serving.service import CriticRewardService, TrainShare
from rlhf_kit.serving.wire import decode, encode, field, float_field, int_field

ENDPOINTS = "POST /infer, /train, /save, /load, /health, /shutdown; GET /health"
_KNOBS = (
    "mini_batch_size",
    "micro_batch_size",
    "micro_batch_tokens",
    "ppo_epochs",
    "max_grad_norm",
    "world_size",
)


def _import_stack():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:  # the actor side (client) needs neither
        raise ImportError(
            f"the critic server needs starlette and uvicorn ({e.name} is missing): "
            "pip install 'rlhf-kit[server]'"
        ) from None
    return uvicorn


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Round:
    """The shares of one global batch, gathered until every rank has sent its own."""

    def __init__(self, world: int, knobs: dict, loop: asyncio.AbstractEventLoop):
        self.world, self.knobs = world, knobs
        self.shares: dict[int, TrainShare] = {}
        self.result: asyncio.Future = loop.create_future()
        self.task: asyncio.Future | None = None  # the update, once every share is in


class _App:
    """The ASGI application: authentication, body limits, dispatch to the service's worker thread."""

    def __init__(self, service, token, read_timeout, max_body_bytes, gather_timeout, on_shutdown):
        self.service = service
        self.token = token.encode() if token else None
        self.read_timeout = read_timeout
        self.max_body_bytes = max_body_bytes
        self.gather_timeout = gather_timeout
        self.on_shutdown = on_shutdown
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="critic-server")
        self.round: _Round | None = None

    def build(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [Route("/health", self._endpoint(self.health), methods=["GET", "POST"])]
        for name in ("infer", "train", "save", "load", "shutdown"):
            routes.append(Route(f"/{name}", self._endpoint(getattr(self, name)), methods=["POST"]))
        return Starlette(routes=routes, exception_handlers={404: self._not_found})

    # ------------------------------------------------------------------------ plumbing
    async def _not_found(self, request, exc):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(f"unknown endpoint {request.url.path} ({ENDPOINTS})", status_code=404)

    def _endpoint(self, fn):
        from starlette.responses import PlainTextResponse, Response

        async def handler(request):
            try:
                self._authorize(request)
                meta, tensors = await self._read(request)
                out = await fn(meta, tensors)
                if isinstance(out, Response):
                    return out
                return Response(encode(*out), media_type="application/octet-stream")
            except _HTTPError as e:
                status, message = e.status, str(e)
            except ValueError as e:  # a bad request: shapes, ids, fields, malformed body, bad path
                status, message = 400, _one_line(e)
            except Exception as e:  # a server-side failure: full traceback in the server's log
                traceback.print_exc(file=sys.stderr)
                status, message = 500, _one_line(e)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
            if status in (408, 413):
                headers["Connection"] = "close"  # the rest of the body is not read
            return PlainTextResponse(message, status_code=status, headers=headers)

        return handler

    def _authorize(self, request) -> None:
        if self.token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token):
            raise _HTTPError(
                401, "unauthorized: send 'Authorization: Bearer <token>' (RLHF_KIT_SERVER_TOKEN)"
            )

    async def _read(self, request) -> tuple[dict, dict]:
        from starlette.requests import ClientDisconnect

        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise _HTTPError(
                413, f"request body of {length} bytes is over the {self.max_body_bytes}-byte limit"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        stream = request.stream().__aiter__()
        chunks, size = [], 0
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0.001))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise _HTTPError(408, f"request body not received within {self.read_timeout} s") from None
            except ClientDisconnect:
                raise _HTTPError(400, "client disconnected during the request body") from None
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _HTTPError(413, f"request body is over the {self.max_body_bytes}-byte limit")
            chunks.append(chunk)
        body = b"".join(chunks)
        return decode(body) if body else ({}, {})

    async def _work(self, fn, *args, **kwargs):
        """``fn`` on the model worker thread (one model request at a time, in arrival order)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    # ------------------------------------------------------------------------ endpoints
    async def health(self, meta, tensors):
        return {"ok": True, **self.service.describe()}, {}

    async def infer(self, meta, tensors):
        values, scores = await self._work(
            self.service.infer,
            field(tensors, "sequences", "tensor"),
            field(tensors, "attention_mask", "tensor"),
            int_field(meta, "prompt_length"),
            field(tensors, "response_mask", "tensor"),
            with_scores=bool(meta.get("with_scores", True)),
        )
        return {}, {"values": values, **({"scores": scores} if scores is not None else {})}

    async def train(self, meta, tensors):
        names = ("sequences", "attention_mask", "response_mask", "values", "returns")
        share = TrainShare(*(field(tensors, n, "tensor") for n in names), int_field(meta, "prompt_length"),
                           int_field(meta, "seed"))  # fmt: skip
        knobs = {k: int_field(meta, k) for k in ("mini_batch_size", "micro_batch_size", "ppo_epochs")}
        knobs["max_grad_norm"] = float_field(meta, "max_grad_norm")
        knobs["micro_batch_tokens"] = int_field(meta, "micro_batch_tokens", 0)  # 0: fixed micro-batches
        world, rank = int_field(meta, "world_size", 1), int_field(meta, "rank", 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world_size {world})")
        share.check(self.service.vocab_size)  # a bad share is refused before it joins a global batch
        loop = asyncio.get_running_loop()
        rnd = self.round
        if rnd is None:
            rnd = self.round = _Round(world, {**knobs, "world_size": world}, loop)
            loop.call_later(self.gather_timeout, self._expire, rnd)
        elif rnd.knobs != {**knobs, "world_size": world}:
            theirs = {k: rnd.knobs[k] for k in _KNOBS}
            raise ValueError(f"rank {rank} sent {knobs | {'world_size': world}}, other ranks of this global "
                             f"batch sent {theirs}")  # fmt: skip
        if rank in rnd.shares:
            raise _HTTPError(409, f"rank {rank} already sent its share of this global batch")
        rnd.shares[rank] = share
        if len(rnd.shares) == rnd.world:  # complete: train in a task of its own, whoever disconnects
            self.round = None
            rnd.task = asyncio.ensure_future(self._train_round(rnd, knobs))
        return await asyncio.shield(rnd.result), {}

    async def _train_round(self, rnd: _Round, knobs: dict) -> None:
        shares = [rnd.shares[r] for r in range(rnd.world)]
        try:
            rnd.result.set_result(await self._work(self.service.train_shares, shares, **knobs))
        except Exception as e:
            rnd.result.set_exception(e)

    def _expire(self, rnd: _Round) -> None:
        if self.round is rnd and not rnd.result.done():
            self.round = None
            missing = sorted(set(range(rnd.world)) - set(rnd.shares))
            rnd.result.set_exception(_HTTPError(
                504, f"global batch incomplete: ranks {missing} of {rnd.world} sent no share within "
                f"{self.gather_timeout} s",
            ))  # fmt: skip

    async def save(self, meta, tensors):
        keep = meta.get("keep_last")
        return {"path": await self._work(self.service.save, str(field(meta, "path")), keep)}, {}

    async def load(self, meta, tensors):
        return {"train_calls": await self._work(self.service.load, str(field(meta, "path")))}, {}

    async def shutdown(self, meta, tensors):
        from starlette.background import BackgroundTask
        from starlette.responses import Response

        # answer first: the process may exit right after
        return Response(encode({"ok": True}), background=BackgroundTask(self.on_shutdown))


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _protocol_class(read_timeout: float):
    """uvicorn's h11 protocol plus a deadline for request headers: a connection that has not sent a
    complete request head within ``read_timeout`` of connecting (or of its previous response) is closed,
    so half-sent requests cannot hold connection slots."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(read_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _head_timeout(self) -> None:
            if self._idle() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if not self._idle():
                self._disarm()  # the head arrived; the app's body deadline takes over

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return HeadTimeoutProtocol


class CriticServer:
    """HTTP front of a :class:`CriticRewardService`. ``port=0`` picks a free port (see :attr:`url`).

    Args:
        auth_token: the shared secret clients send as ``Authorization: Bearer <token>``; required for
            a non-loopback ``host`` unless ``allow_unauthenticated``.
        read_timeout: seconds for a request's head, and then for its body. idle_timeout: seconds a
            keep-alive connection may sit idle. max_body_bytes, max_connections: limits (413, 503).
        gather_timeout: seconds ``/train`` waits for the other ranks of a global batch (504 after).
        verbose: log every request (uvicorn's access log) on stderr.
    """

    def __init__(
        self,
        service: CriticRewardService,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
        *,
        auth_token: str | None = None,
        allow_unauthenticated: bool = False,
        read_timeout: float = 60.0,
        idle_timeout: float = 30.0,
        max_body_bytes: int = 1 << 30,
        max_connections: int = 64,
        gather_timeout: float = 600.0,
    ):
        uvicorn = _import_stack()
        if auth_token is not None and (not auth_token or any(c.isspace() for c in auth_token)):
            raise ValueError("the auth token must be a non-empty string without whitespace")
        if auth_token is None and not is_loopback(host) and not allow_unauthenticated:
            raise ValueError(
                f"listening on {host!r} (not loopback) needs an auth token: --auth-token or "
                "RLHF_KIT_SERVER_TOKEN (or --allow-unauthenticated on a trusted network)"
            )
        self.service = service
        self.host = host
        self.app = _App(service, auth_token, read_timeout, max_body_bytes, gather_timeout, self._stop)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError:
            self.socket.close()
            raise
        self.socket.listen(2048)
        config = uvicorn.Config(
            self.app.build(), http=_protocol_class(read_timeout), lifespan="off", log_config=None,
            log_level="info" if verbose else "warning", access_log=verbose, limit_concurrency=max_connections,
            timeout_keep_alive=max(1, round(idle_timeout)), timeout_graceful_shutdown=5,
        )  # fmt: skip
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = socket.gethostname() if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def _stop(self) -> None:
        self.uvicorn.should_exit = True

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`, a ``/shutdown`` request or Ctrl-C; the socket is closed on return."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.socket.close()
            self.app.pool.shutdown(wait=False)

    def start(self) -> CriticServer:
        """Serve from a background daemon thread (tests, notebooks); returns ``self`` once serving."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            self._thread.join(0.01)
        return self

    def shutdown(self) -> None:
        """Stop the background thread started by :meth:`start` and close the socket."""
        self._stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.socket.close()

    def __enter__(self) -> CriticServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
