"""The view's web app (Starlette): server-rendered pages, one JSON feed the page polls, archive images.

Every route is GET (HEAD): nothing here changes the line. All ledger and socket work runs on one worker
thread, and the page data is rebuilt at most once per refresh period however many panels poll it, so
the load the view puts on the device is bounded by its settings, not by its audience.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, TypeVar

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .data import LineData, ViewOptions

HERE = Path(__file__).resolve().parent
T = TypeVar("T")

# Everything is served from this process: the plant network has no internet, and the page runs no
# inline script or style, so the policy can forbid everything else.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                                 b"object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class _SecurityHeaders:
    """Pure ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)
        await self.app(scope, receive, with_headers)


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda value, digits=3: "–" if value is None else f"{value:.{digits}f}"
    env.filters["ms"] = lambda value: "–" if value is None else f"{value:.1f} ms"
    env.filters["clock"] = lambda epoch, seconds=False: datetime.fromtimestamp(epoch).astimezone().strftime(
        "%H:%M:%S" if seconds else "%H:%M")
    return env


def create_app(options: ViewOptions, refresh_s: float = 2.0) -> Starlette:
    """The operator view of the line described by ``options``; pages poll every ``refresh_s`` seconds."""
    data = LineData(options)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="view-data")
    templates = _templates()
    cached: dict = {"at": -1e9, "page": None}

    async def on_worker(fn: Callable[..., T], *args) -> T:
        return await asyncio.wrap_future(worker.submit(fn, *args))

    def snapshot() -> dict:
        if time.monotonic() - cached["at"] >= 0.5 * refresh_s:
            cached["page"], cached["at"] = data.snapshot(), time.monotonic()
        return cached["page"]

    def render(name: str, status_code: int = 200, **context) -> HTMLResponse:
        html = templates.get_template(name).render(line=options.line_name, refresh_ms=int(refresh_s * 1000),
                                                   **context)
        return HTMLResponse(html, status_code=status_code, headers={"cache-control": "no-store"})

    async def index(request: Request) -> Response:
        return render("index.html", page=await on_worker(snapshot))

    async def live(request: Request) -> Response:
        return JSONResponse(await on_worker(snapshot), headers={"cache-control": "no-store"})

    async def part_data(request: Request) -> dict:
        row = await on_worker(data.row, request.path_params["seq"])
        if row is None:
            raise HTTPException(404, f"no part with sequence number {request.path_params['seq']} in the ledger")
        return await on_worker(data.describe, row)

    async def part_page(request: Request) -> Response:
        return render("part.html", part=await part_data(request))

    async def part_json(request: Request) -> Response:
        return JSONResponse(await part_data(request))

    async def archive_image(request: Request) -> Response:
        seq, kind = request.path_params["seq"], request.path_params["kind"]
        if kind == "thumb":
            thumb = await on_worker(data.thumbnail, seq)
            if thumb is None:
                raise HTTPException(404, f"part {seq} has no archived image")
            return Response(thumb, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})
        path = await on_worker(data.image_path, seq, kind)
        if path is None:
            raise HTTPException(404, f"part {seq} has no archived {kind}")
        # Archive files never change once written (a re-archived part replaces the file atomically).
        return FileResponse(path, headers={"cache-control": "private, max-age=3600"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith(("/api/", "/archive/")):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        return render("error.html", status_code=exc.status_code, status=exc.status_code, message=exc.detail)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await on_worker(data.close)
        worker.shutdown(wait=True)

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/part/{seq:int}", part_page, methods=["GET"]),
        Route("/api/live", live, methods=["GET"]),
        Route("/api/part/{seq:int}", part_json, methods=["GET"]),
        Route("/archive/{seq:int}/{kind:str}", archive_image, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: error})
    app.add_middleware(_SecurityHeaders)
    return app
