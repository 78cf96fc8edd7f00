"""The ASGI application: OpenAI's endpoints over an `Engine` (starlette; uvicorn runs it).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models[/{id}]   GET /health

Every failure is a JSON body in OpenAI's error shape {"error": {"message", "type", "param",
"code"}}: 400 for a bad body, 401 without the right `Authorization: Bearer KEY` (when the server
has an --api-key; /health stays open for load balancers), 404/405 for unknown routes, 413 for a
body over `max_body` bytes, 429 with Retry-After when the queue is full, 503 once the worker has
stopped; a 500 only for a failure of the server itself (logged, never a traceback to the client).
The `model` of a request is not checked: the server serves one policy, named in every answer.
A client that disconnects while its request waits or runs cancels it (`Engine.cancel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qprobe.errors import ConfigError
from qprobe.serve.engine import Answer, Engine, Job, QueueFull
from qprobe.serve.protocol import (
    PolicyRequest,
    RequestError,
    ServeDefaults,
    parse_chat_body,
    parse_completion_body,
    parse_json,
)
from qprobe.serve.responses import chat_body, completion_body, error_body, stream_events

log = logging.getLogger("qprobe.serve")
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class ServeInfo:
    """What the server says about itself: the model id it answers as, the request defaults, the
    API key it requires (None: none), and `about` (probe and back-end, shown by /v1/models)."""

    model_id: str
    defaults: ServeDefaults = field(default_factory=ServeDefaults)
    api_key: str | None = None
    about: dict[str, Any] = field(default_factory=dict)
    max_body: int = 8 * 2**20


def error_response(error: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=headers)


def make_app(engine: Engine, info: ServeInfo) -> Starlette:
    """The application; its lifespan starts the engine's worker and stops it (the back-end stays open)."""
    api = _Api(engine, info)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    routes = [Route("/v1/chat/completions", api.guard(api.chat), methods=["POST"]),
              Route("/v1/completions", api.guard(api.completions), methods=["POST"]),
              Route("/v1/models", api.guard(api.models), methods=["GET"]),
              Route("/v1/models/{model_id:path}", api.guard(api.model), methods=["GET"]),
              Route("/health", api.guard(api.health, open_=True), methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error, Exception: _server_error})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    what = f"{request.method} {request.url.path}"
    error = RequestError(f"expected one of POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health; "
                         f"got {what} ({exc.detail})", status=exc.status_code, code=code)
    return error_response(error, headers=dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
    return error_response(RequestError("the server failed on this request; see its log", status=500, type="server_error"))


class _Api:
    def __init__(self, engine: Engine, info: ServeInfo) -> None:
        self.engine, self.info = engine, info
        self.created = int(time.time())

    def guard(self, handler: Handler, open_: bool = False) -> Handler:
        """Authorization first (unless `open_`), then the handler; errors become OpenAI-shaped bodies."""
        async def guarded(request: Request) -> Response:
            try:
                if not open_ and self.info.api_key is not None:
                    self._authorize(request)
                return await handler(request)
            except RequestError as exc:
                return error_response(exc)
            except ConfigError as exc:  # a value the configs refuse (SamplingConfig, ...): the request's fault
                return error_response(RequestError(str(exc)))
            except Exception:
                log.exception("request %s %s failed", request.method, request.url.path)
                return error_response(RequestError("the server failed on this request; see its log", status=500,
                                                   type="server_error"))
        return guarded

    def _authorize(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = self.info.api_key or ""
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return
        got = "no Authorization header" if "authorization" not in request.headers else "a wrong key"
        raise RequestError(f"expected the header 'Authorization: Bearer KEY' with the server's --api-key, got {got}",
                           status=401, code="invalid_api_key")

    async def _body(self, request: Request) -> dict[str, Any]:
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > self.info.max_body:
            raise RequestError(f"expected a body of at most {self.info.max_body} bytes, got {size}", status=413,
                               code="body_too_large")
        raw = await request.body()
        if len(raw) > self.info.max_body:
            raise RequestError(f"expected a body of at most {self.info.max_body} bytes, got {len(raw)}", status=413,
                               code="body_too_large")
        return parse_json(raw)

    async def chat(self, request: Request) -> Response:
        req = parse_chat_body(await self._body(request), self.info.defaults)
        return await self._answer(request, req, chat=True)

    async def completions(self, request: Request) -> Response:
        req = parse_completion_body(await self._body(request), self.info.defaults)
        return await self._answer(request, req, chat=False)

    async def _answer(self, request: Request, req: PolicyRequest, chat: bool) -> Response:
        if not self.engine.alive:
            raise RequestError("the server's worker has stopped; restart the server", status=503, type="server_error")
        loop = asyncio.get_running_loop()
        jobs = [Job(p, req.n, req.k, req.beta, req.sampling, loop.create_future(), loop) for p in req.prompts]
        admitted: list[Job] = []
        try:
            for job in jobs:
                self.engine.submit(job)
                admitted.append(job)
        except QueueFull as full:
            for job in admitted:
                self.engine.cancel(job)
            error = RequestError(f"expected room in the server's queue, got {full}; retry after {full.retry_after} s "
                                 "(or start the server with a larger --queue)", status=429, type="rate_limit_error",
                                 code="queue_full")
            return error_response(error, headers={"Retry-After": str(full.retry_after)})
        answers = await self._wait(request, jobs)
        if answers is None:  # the client has gone; nobody reads this
            return Response(status_code=499)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created, model = int(time.time()), self.info.model_id
        if req.stream:
            async def events() -> AsyncIterator[str]:
                for event in stream_events(rid, created, model, req, answers, chat):
                    yield event
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        body = (chat_body if chat else completion_body)(rid, created, model, req, answers)
        return JSONResponse(body)

    async def _wait(self, request: Request, jobs: list[Job]) -> list[Answer] | None:
        """The jobs' answers, or None when the client disconnects first (its jobs are cancelled)."""
        gathered = asyncio.gather(*(job.future for job in jobs))
        gathered.add_done_callback(_retrieved)  # a cancelled wait's outcome is read by nobody else
        gone = asyncio.ensure_future(_disconnected(request))
        waiters: set[asyncio.Future[Any]] = {gathered, gone}
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if gathered in done:
                return list(gathered.result())
        except BaseException:  # a job failed (its RequestError goes on), or this task was cancelled
            for job in jobs:
                self.engine.cancel(job)
            raise
        finally:
            gone.cancel()
        for job in jobs:
            self.engine.cancel(job)
        gathered.cancel()
        return None

    def _model(self) -> dict[str, Any]:
        return {"id": self.info.model_id, "object": "model", "created": self.created, "owned_by": "qprobe",
                "qprobe": {**self.info.about, "defaults": asdict(self.info.defaults)}}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["model_id"] != self.info.model_id:
            raise RequestError(f"expected the model '{self.info.model_id}', got '{request.path_params['model_id']}'",
                               status=404, param="model", code="model_not_found")
        return JSONResponse(self._model())

    async def health(self, request: Request) -> Response:
        alive = self.engine.alive
        body = {"status": "ok" if alive else "stopped", "model": self.info.model_id,
                "queue": {"waiting": self.engine.queued(), "size": self.engine.queue_size},
                "stats": asdict(self.engine.stats)}
        return JSONResponse(body, status_code=200 if alive else 503)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: only that can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@contextlib.contextmanager
def serve_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL (http://HOST:PORT/v1).
    Port 0 picks a free one. Leaving stops the server (the engine's worker with it)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="qprobe-serve-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigError(f"expected the server to start on {host}:{port} within {timeout:g} s, got none; "
                              "see its log (is the port in use?)")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout)
