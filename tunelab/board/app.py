"""The board's web app (Starlette): a JSON API over run folders (docs/board.md) and the static front end.

Safety: every request's Host header must name the address and port the board serves (no DNS rebinding: a
page on another site that resolves its own name to 127.0.0.1 gets 400); a request with an Origin header
from any other origin gets 403 (no cross-site requests); run names and file paths never leave RUNS_DIR; and
requests that change state or make the server work on the caller's behalf (chat, cost, launch, stop,
resume) are POSTs carrying the secret token made at start-up. The token is printed only in the URL that
`tunelab board` prints; the page keeps it from there (never served in a page), so a process that can
only reach the port, or a page that rebinds a name to it, cannot learn it.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
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
    """Host header names accepted: the loopback names when serving on loopback, else the given host and
    loopback (a board bound to all interfaces (0.0.0.0) accepts any Host; the token still guards POSTs)."""
    if host in ("0.0.0.0", "::"):
        return ["*"]
    return sorted({*LOOPBACK, host}) if host in LOOPBACK else [host, *LOOPBACK]


def split_host(value: str) -> tuple[str, int | None]:
    """"127.0.0.1:7860" -> ("127.0.0.1", 7860); "[::1]:80" -> ("::1", 80); no port -> (name, 80)."""
    name, sep, port = value.rpartition(":")
    if not sep or name.endswith(":") or (value.startswith("[") and not name.endswith("]")):
        name, port = value, "80"  # no port (a bare IPv6 address has colons of its own)
    return name.strip("[]").lower(), int(port) if port.isdigit() else None


class Guard:
    """ASGI middleware: the Host header must be this board's name and port (else 400), and an Origin header,
    when the browser sends one, must be the board's own origin http://<Host> (else 403)."""

    def __init__(self, app, hosts: list[str], port: int):
        self.app, self.hosts, self.port = app, {h.strip("[]") for h in hosts}, port

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host = headers.get("host", "")
            name, port = split_host(host)
            if ("*" not in self.hosts and name not in self.hosts) or port != self.port:
                answer = JSONResponse({"error": f"Host header {host!r} is not this board's address (port "
                                                f"{self.port}): refused"}, 400)
                return await answer(scope, receive, send)
            origin = headers.get("origin")
            if origin is not None and origin.lower() != f"http://{host}".lower():
                answer = JSONResponse({"error": f"a request from another site (Origin {origin}) is refused"}, 403)
                return await answer(scope, receive, send)
        await self.app(scope, receive, send)


def _arg(request: Request, key: str, default=None, kind=str):
    value = request.query_params.get(key, default)
    if value is None:
        raise BoardError(f"missing query parameter {key!r}")
    try:
        return kind(value)
    except ValueError:
        raise BoardError(f"query parameter {key}={value!r} is not a {kind.__name__}") from None


def create_app(root: Path, host: str = "127.0.0.1", token: str | None = None, port: int = 7860,
               configs: Path | None = None) -> Starlette:
    """The board for the runs under `root`, served at host:port; `token` (default: a new random one) guards
    POST requests; launches read config files under `root` or `configs` (default ./configs)."""
    from tunelab.board.launch import Launcher

    root = Path(root)
    token = token or secrets.token_urlsafe(24)
    state = {"chat": None}
    launcher = Launcher(root, configs)

    def run_of(request: Request) -> Path:
        return R.locate(root, _arg(request, "name"))

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

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
            raise BoardError("missing or wrong X-Board-Token header: open the board at the URL `tunelab board` "
                             "printed (it carries ?token=...); POST requests come from the board's own page", 403)
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

    # ---- launch, stop, resume (tunelab/board/launch.py) ----
    async def configs(request: Request):
        from tunelab.board.launch import BOARD_SETS, schema_fields

        fields = [f for f in schema_fields() if f["key"] not in BOARD_SETS]
        return JSONResponse({"configs": launcher.config_files(), "fields": fields, "runs_dir": str(root.resolve())})

    async def jobs(request: Request):
        return JSONResponse({"jobs": launcher.rows()})

    def posted(method, *keys):  # a POST whose JSON body's `keys` are a Launcher method's arguments (off the loop)
        async def endpoint(request: Request):
            from starlette.concurrency import run_in_threadpool

            body = await post_json(request)
            return JSONResponse(await run_in_threadpool(method, *(body.get(k) for k in keys)))
        return endpoint

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
        Route("/api/configs", configs),
        Route("/api/jobs", jobs),
        Route("/api/cost", posted(launcher.cost, "config", "overrides"), methods=["POST"]),
        Route("/api/launch", posted(launcher.launch, "config", "overrides", "name"), methods=["POST"]),
        Route("/api/stop", posted(launcher.stop, "name"), methods=["POST"]),
        Route("/api/resume", posted(launcher.resume, "name"), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, hosts=allowed_hosts(host), port=port)],
                    exception_handlers={TunelabError: clear_error, Exception: other_error})
    app.state.token, app.state.launcher = token, launcher
    return app
