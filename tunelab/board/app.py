"""The board's web app (Starlette): a JSON API over run folders (docs/board.md) and the static front end.

Safety: every request's Host header must name the address the board serves (no DNS rebinding: a page on
another site that resolves its own name to 127.0.0.1 gets 400), run names and file paths never leave
RUNS_DIR, and requests that make the server work on the caller's behalf (chat: loads models, runs them)
are POSTs carrying the secret token made at start-up, which only the board's own page holds.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tunelab.board import runs as R
from tunelab.board.runs import BoardError
from tunelab.errors import TunelabError

STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
FILE_TYPES = {".png": "image/png", ".md": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8",
              ".json": "application/json", ".jsonl": "text/plain; charset=utf-8", ".yaml": "text/plain; charset=utf-8",
              ".html": "text/plain; charset=utf-8"}  # a run's HTML report is shown as text, never run as a page


def allowed_hosts(host: str) -> list[str]:
    """Host header values accepted: the loopback names when serving on loopback, else the given host and
    loopback (a board bound to all interfaces (0.0.0.0) accepts any Host; the token still guards POSTs)."""
    if host in ("0.0.0.0", "::"):
        return ["*"]
    return sorted({*LOOPBACK, host}) if host in LOOPBACK else [host, *LOOPBACK]


def _arg(request: Request, key: str, default=None, kind=str):
    value = request.query_params.get(key, default)
    if value is None:
        raise BoardError(f"missing query parameter {key!r}")
    try:
        return kind(value)
    except ValueError:
        raise BoardError(f"query parameter {key}={value!r} is not a {kind.__name__}") from None


def create_app(root: Path, host: str = "127.0.0.1", token: str | None = None) -> Starlette:
    """The board for the runs under `root`; `token` (default: a new random one) guards POST requests."""
    root = Path(root)
    token = token or secrets.token_urlsafe(24)
    state = {"chat": None}

    def run_of(request: Request) -> Path:
        return R.locate(root, _arg(request, "name"))

    async def index(request: Request):
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("__BOARD_TOKEN__", token).replace("__RUNS_DIR__", str(root.resolve())))

    async def runs_list(request: Request):
        return JSONResponse({"root": str(root.resolve()), "runs": [R.run_row(root, n) for n in R.find_runs(root)]})

    async def run_detail(request: Request):
        return JSONResponse(R.run_detail(root, _arg(request, "name")))

    async def metrics(request: Request):
        return JSONResponse(R.read_metrics(run_of(request), _arg(request, "since", 0, int)))

    async def data(request: Request):
        from tunelab.board.data import examples

        run = run_of(request)
        return JSONResponse(examples(run, _arg(request, "split", "train"), _arg(request, "start", 0, int),
                                     _arg(request, "n", 4, int)))

    async def evals(request: Request):
        return JSONResponse({"evals": R.evaluations(run_of(request))})

    async def file(request: Request):
        run, rel = run_of(request), _arg(request, "path")
        path = (run / rel).resolve()
        if ".." in Path(rel).parts or Path(rel).is_absolute() or run.resolve() not in path.parents:
            raise BoardError(f"path {rel!r} is not inside the run folder: refused", 403)
        if not path.is_file() or path.suffix not in FILE_TYPES:
            raise BoardError(f"no file {rel!r} of a shown type ({', '.join(FILE_TYPES)}) in the run", 404)
        return FileResponse(path, media_type=FILE_TYPES[path.suffix])

    async def post_json(request: Request) -> dict:
        if not secrets.compare_digest(request.headers.get("x-board-token", ""), token):
            raise BoardError("missing or wrong X-Board-Token header: POST requests come from the board's own page", 403)
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise BoardError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise BoardError("the request body must be a JSON object")
        return body

    def chat_models():
        from tunelab.board.chat import ChatModels

        state["chat"] = state["chat"] or ChatModels()
        return state["chat"]

    async def template(request: Request):
        from starlette.concurrency import run_in_threadpool

        body = await post_json(request)
        run = R.locate(root, str(body.get("name", "")))
        return JSONResponse(await run_in_threadpool(chat_models().template, run, body.get("messages")))

    async def chat(request: Request):
        from tunelab.board.chat import check_messages

        body = await post_json(request)
        run = R.locate(root, str(body.get("name", "")))
        check_messages(body.get("messages"))
        try:
            settings = {"max_new_tokens": int(body.get("max_new_tokens", 128)),
                        "temperature": float(body.get("temperature", 0.0))}
        except (TypeError, ValueError):
            raise BoardError("max_new_tokens must be an integer and temperature a number") from None

        def events():  # server-sent events; a problem loading the model becomes an error event, not a crash
            try:
                for ev in chat_models().stream(run, body["messages"], **settings):
                    yield f"data: {json.dumps(ev)}\n\n"
            except Exception as e:  # noqa: BLE001
                msg = str(e) if isinstance(e, TunelabError) else f"{type(e).__name__}: {e}"
                yield f"data: {json.dumps({'error': msg})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def clear_error(request: Request, exc: TunelabError):  # BoardError or e.g. a model source not found
        return JSONResponse({"error": str(exc)}, status_code=getattr(exc, "code", 400))

    async def other_error(request: Request, exc: Exception):  # a bug: still one JSON line for the page
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    routes = [
        Route("/", index),
        Route("/api/runs", runs_list),
        Route("/api/run", run_detail),
        Route("/api/metrics", metrics),
        Route("/api/data", data),
        Route("/api/evals", evals),
        Route("/api/file", file),
        Route("/api/template", template, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host))],
                    exception_handlers={TunelabError: clear_error, Exception: other_error})
    app.state.token = token
    return app
