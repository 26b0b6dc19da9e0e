"""`tunelab board [RUNS_DIR]`: serve the dashboard on 127.0.0.1:7860 (local only unless --host says otherwise)."""

from __future__ import annotations

import socket
from pathlib import Path

from tunelab.errors import TunelabError

INSTALL = "pip install 'tunelab[board]' (starlette and uvicorn)"


def add_arguments(p) -> None:
    p.add_argument("runs_dir", nargs="?", default="runs", help="folder of run folders (default: runs)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the board "
                        "and your runs' data to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--configs", default="configs",
                   help="folder of YAML configs the launch form offers (default ./configs; besides each run's own)")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error naming the port in use (the server never starts half-way)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == 98 or "in use" in str(e):
            raise TunelabError(f"port {port} on {host} is in use (another board or server?): pass --port N, "
                               "or --port 0 for any free port") from None
        raise TunelabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(64)
    return sock


def run(args) -> int:
    root = Path(args.runs_dir)
    if not root.is_dir():
        raise TunelabError(f"{root} is not a folder: give the folder your runs are in (tunelab train writes runs/)")
    if not 0 <= args.port <= 65535:
        raise TunelabError(f"--port must be 0..65535, got {args.port}")
    try:
        import uvicorn

        from tunelab.board.app import create_app
    except ImportError as e:
        raise TunelabError(f"the board needs {e.name}: {INSTALL}") from None
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    app = create_app(root, args.host, port=port, configs=Path(args.configs))
    shown = f"[{host}]" if ":" in host else host
    # the token travels only in this URL: the page keeps it and sends it with every POST (X-Board-Token)
    print(f"tunelab board: serving {root.resolve()} on http://{shown}:{port}/?token={app.state.token} "
          "(Ctrl-C stops)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"tunelab board: listening on {args.host}: anyone who can reach this address can read your runs")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    server.run(sockets=[sock])
    return 0
