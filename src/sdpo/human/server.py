"""The web app of ``sdpo label`` and ``sdpo rate``: one page, four JSON calls, token media; Starlette + uvicorn.

Starlette rather than gradio: the page is keyboard-first and needs exact control over what is
served (token URLs only, no uploads, validated answers), and it stays a few kilobytes of plain HTML
and JavaScript with no build step.

Routes: ``GET /`` (the page), ``GET /static/{app.js,style.css}``, ``GET /api/state``, ``POST
/api/answer``, ``POST /api/undo``, ``POST /api/end`` and ``GET /media/<token>``. Everything else is 404.
On a loopback address, a request whose Host header names another machine is refused (400). A POST
must be ``application/json`` (so another site's page cannot send one without a CORS preflight, which
this app never grants) of at most 4 KiB (anything else, a form or an upload, is refused
with 415 / 413); a refused request writes nothing and gets ``{"error": "..."}`` with a 4xx status.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
import time
from importlib import resources
from typing import Any

from sdpo.errors import InputError, MissingPackageError
from sdpo.human.session import Refused, Session

MAX_BODY = 4096
"""Largest request body accepted, in bytes."""
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
"""The page's own files (package data of ``sdpo.human``)."""


def _starlette() -> Any:
    try:
        import starlette.applications  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MissingPackageError("the labelling pages need starlette and uvicorn: pip install 'sdpo[human]'") from None


def _static(name: str) -> bytes:
    return resources.files("sdpo.human").joinpath("static").joinpath(name).read_bytes()


def make_app(session: Session, host: str = "127.0.0.1") -> Any:
    """The Starlette app serving ``session`` on ``host``. On a loopback address only requests for that
    name are answered (Host header 127.0.0.1, localhost or ::1), so a web site that points its own name
    at 127.0.0.1 (DNS rebinding) cannot read the media or answer as the rater."""
    _starlette()
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    lock = threading.Lock()  # one answer at a time: the queue's order is the file's order

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def page(request: Request) -> Response:
        return Response(_static("index.html"), media_type=STATIC["index.html"], headers=_NO_CACHE)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC or name == "index.html":
            return error(404, "not found")
        return Response(_static(name), media_type=STATIC[name], headers=_NO_CACHE)

    async def state(request: Request) -> Response:
        return JSONResponse(session.state(), headers=_NO_CACHE)

    async def media(request: Request) -> Response:
        found = session.media.lookup(request.path_params["token"])
        if found is None:
            return error(404, "no such media")
        path, content_type = found
        return FileResponse(path, media_type=content_type, headers=_NO_CACHE)

    def call(method: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                body = await _body(request)
                with lock:
                    return JSONResponse(method(body), headers=_NO_CACHE)
            except Refused as refused:
                return error(refused.status, refused.message)

        return endpoint

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, "not found")

    routes = [Route("/", page), Route("/static/{name}", static), Route("/api/state", state),
              Route("/api/answer", call(session.answer), methods=["POST"]),
              Route("/api/undo", call(session.undo), methods=["POST"]),
              Route("/api/end", call(session.end), methods=["POST"]),
              Route("/media/{token}", media)]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"])] \
        if is_loopback(host) else []
    return Starlette(routes=routes, exception_handlers={404: not_found}, middleware=middleware)


_NO_CACHE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


async def _body(request: Any) -> Any:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise Refused(415, "only JSON answers are accepted (no forms, no uploads)")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise Refused(413, f"request body over {MAX_BODY} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise Refused(413, f"request body over {MAX_BODY} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "malformed JSON body") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` listens only on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_host(host: str) -> None:
    """A warning on stderr when ``host`` is reachable from other machines."""
    if not is_loopback(host):
        print(f"sdpo: warning: listening on {host}: anyone who can reach this machine can see the media and "
              "answer as this rater (the default, 127.0.0.1, is this machine only)", file=sys.stderr)


def serve(session: Session, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve ``session`` until Ctrl-C."""
    _starlette()
    import uvicorn

    check_port_free(host, port)
    warn_host(host)
    uvicorn.run(make_app(session, host), host=host, port=port, log_level="warning")


def check_port_free(host: str, port: int) -> None:
    """InputError (one line) when ``host:port`` cannot be listened on (in use, or not an address here)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise InputError(f"cannot listen on {host}:{port} ({error.strerror or error}): choose another --port "
                         "(or --host)") from None


class BackgroundServer:
    """``session``'s app served in a thread (for tests and notebooks): ``with BackgroundServer(s, port): ...``."""

    def __init__(self, session: Session, port: int, host: str = "127.0.0.1") -> None:
        _starlette()
        import uvicorn

        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(make_app(session, host), host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the page server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


__all__ = ["BackgroundServer", "MAX_BODY", "check_port_free", "is_loopback", "make_app", "serve", "warn_host"]
