"""`tunesmith ui`: the browser app over the runs and data folders (tunesmith.ui), started on this machine."""

from __future__ import annotations

import argparse
import secrets
import socket
from pathlib import Path

from tunesmith.cli.common import err, out
from tunesmith.errors import TunesmithError


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def cmd_ui(args: argparse.Namespace) -> int:
    import uvicorn

    from tunesmith.ui.app import create_app
    from tunesmith.ui.launcher import Launcher

    runs, data = Path(args.runs), Path(args.data)
    if not data.is_dir():
        raise TunesmithError(f"--data {data}: no such folder. Name the folder holding your data files.")
    runs.mkdir(parents=True, exist_ok=True)
    port = args.port or _free_port(args.host)
    token = secrets.token_urlsafe(24)
    launcher = Launcher(runs, max_trainings=args.max_trainings)
    hosts = {args.host if ":" not in args.host else f"[{args.host}]"} | set(args.allow_host or [])
    app = create_app(runs, data, token, launcher, hosts, port)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else hosts.pop()
    url = f"http://{shown}:{port}/?token={token}"
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] listening on {args.host}: anyone who can reach it and has the token can "
                  "launch runs and write files in these folders.")  # fmt: skip
    out.print(f"tunesmith ui: runs {runs.resolve()}, data {data.resolve()}", highlight=False)
    print(f"Open {url}", flush=True)  # plain print: the address must never be wrapped or styled
    if not args.no_browser:
        import webbrowser

        webbrowser.open(url)
    launcher.start()
    try:
        uvicorn.run(app, host=args.host, port=port, log_level="warning")
    finally:
        launcher.close()  # runs already started keep training; the next `tunesmith ui` finds them
        app.state.ui.playground.close()
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    ui = sub.add_parser(
        "ui",
        help="Browser app: runs, live curves, new runs, data check and review, compare, playground.",
        description="Serve a local web app over the runs folder and the data folder. It prints the address with "
        "its access token; runs launched from it keep training when it stops.",
    )
    ui.add_argument("--runs", default="runs", help="Folder of run directories [default: runs].")
    ui.add_argument("--data", default=".", help="Folder whose data files and models the app may use [default: .].")
    ui.add_argument("--host", default="127.0.0.1", help="Address to listen on [default: 127.0.0.1].")
    ui.add_argument(
        "--allow-host",
        action="append",
        metavar="NAME",
        help="A further host name or address browsers may use to reach the app (e.g. with --host 0.0.0.0, the "
        "machine's name or IP); repeatable. Other Host headers are refused (DNS rebinding) [default: none].",
    )
    ui.add_argument("--port", type=int, default=0, help="Port [default: a free one].")
    ui.add_argument("--no-browser", action="store_true", help="Print the address without opening a browser.")
    ui.add_argument(
        "--max-trainings",
        type=int,
        default=1,
        help="Trainings run at once; more wait in a queue the Runs page shows [default: 1].",
    )
    ui.set_defaults(func=cmd_ui)
