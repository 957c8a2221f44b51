"""The browser UI's server: pages and a JSON API over the same run directories and data files the CLI uses.

Every answer is read from the files the stages write (manifest, metrics.jsonl, check.json, compare.json through
evaluate.compare.read_comparison in evaluate.report.build_report) or computed by the stage's own function
(check_data, plan_run, data.review); the UI keeps no state of its own beyond the launcher's queue. It must never
act for another web page: every request needs the token, a Host naming this machine and, to change anything, this
page's own Origin; and no path taken from a request reaches outside the runs and data folders it was started on.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.requests import Request  # at module level, where FastAPI resolves the endpoints' annotations
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse

from tunesmith.deploy import guard
from tunesmith.errors import TunesmithError
from tunesmith.files import finite
from tunesmith.rundir import RunDir
from tunesmith.ui.launcher import HOME, Launcher

STATIC = Path(__file__).parent / "static"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SAFE_METHODS = ("GET", "HEAD")
# Limits, like serve's: no request, note or data file may cost the machine more than a person's use of it would.
MAX_BODY_BYTES = 2**20  # largest request body (a form, a verdict with its edited answer); more gets 413 unread
MAX_NOTE_CHARS = 8 * 2**10  # a reviewer's note
MAX_EDIT_CHARS = 64 * 2**10  # an edited answer
MAX_DATA_BYTES = 256 * 2**20  # a data file the pages check or review (read whole); larger ones: the CLI
MAX_LISTED_FILES = 500  # data files /api/files lists
MAX_WALKED_ENTRIES = 20_000  # folder entries /api/files looks at before it stops (a home folder given as --data)
# Pages of this UI run only its own scripts and styles, and no other page may frame it (a framed UI could be
# clicked through into Stop or Launch).
SECURITY_HEADERS = (
    (b"content-security-policy",
     b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)  # fmt: skip
# The settings the New run form offers, in its order; their help is the config field's own description.
FORM_FIELDS = (
    "name", "data.path", "model", "method", "objective", "train.max_steps", "train.epochs", "train.lr",
    "train.batch_size", "lora.r", "data.max_length", "data.test_fraction", "data.allow_warnings", "validation.every",
)  # fmt: skip


class Refused(Exception):
    """A request the UI will not serve: status and a message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- Security: token, Host, Origin ------------------------------------------------------------------------------


class Guard:
    """ASGI middleware in front of every route.

    - Host must name this machine (or the host it was bound to): a page on attacker.example whose name was
      re-pointed at 127.0.0.1 (DNS rebinding) sends its own name and is refused.
    - The token must come as the cookie this server set, a Bearer header, or ?token= (which sets the cookie and
      redirects to the same page without it). The cookie is SameSite=Strict: no other site's request carries it.
    - A request that changes anything (not GET/HEAD) must carry this page's own Origin; any Origin sent must be it.
    - A body over MAX_BODY_BYTES is refused before it is read; every answer carries SECURITY_HEADERS.
    """

    def __init__(self, app: Any, token: str, hosts: set[str], cookie: str) -> None:
        self.app, self.token, self.hosts, self.cookie = app, token, {h.lower() for h in hosts}, cookie

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        secured = _secured(send)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        method = scope["method"]
        origin = headers.get("origin")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if guard.host_name(host).lower() not in self.hosts:
            response: Any = PlainTextResponse(
                f"Host {host!r} is not this tunesmith ui. To reach it under that name, start it with "
                f"--allow-host {guard.host_name(host)}.",
                status_code=421,
            )
        elif origin is not None and origin != f"http://{host}":
            response = PlainTextResponse("Cross-origin requests are refused.", status_code=403)
        elif method not in SAFE_METHODS and origin is None:
            response = PlainTextResponse("A request that changes anything must carry its Origin.", status_code=403)
        elif "token" in query and method in SAFE_METHODS and self._valid(query["token"][-1]):
            rest = urlencode({k: v for k, v in query.items() if k != "token"}, doseq=True)
            response = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), status_code=303)
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
        elif self._authorised(headers):
            body = await guard.read_body(scope, receive, MAX_BODY_BYTES)
            if body is guard.GONE:
                return
            if body is not guard.TOO_LARGE:
                await self.app(scope, guard.replay(body, receive), secured)
                return
            response = JSONResponse(
                {"error": f"The request is over this UI's limit of {MAX_BODY_BYTES} bytes; send less."},
                status_code=413, headers={"Connection": "close"},
            )  # fmt: skip
        else:
            response = PlainTextResponse(
                "Open the address `tunesmith ui` printed (it carries the token).", status_code=401
            )
        await response(scope, receive, secured)

    def _valid(self, candidate: str | None) -> bool:
        return bool(candidate) and secrets.compare_digest(candidate.encode(), self.token.encode())

    def _authorised(self, headers: Headers) -> bool:
        auth = headers.get("authorization", "")
        bearer = auth[7:] if auth.lower().startswith("bearer ") else None
        cookies = headers.get("cookie", "")
        sent = [c.split("=", 1)[1] for c in cookies.split("; ") if c.startswith(f"{self.cookie}=")]
        return self._valid(bearer) or any(self._valid(c) for c in sent)


def _secured(send: Any) -> Any:
    """An ASGI send that adds SECURITY_HEADERS to the response it starts."""

    async def send_secured(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = message | {"headers": [*message.get("headers", []), *SECURITY_HEADERS]}
        await send(message)

    return send_secured


# --- Paths: nothing outside the folders the UI was started on -----------------------------------------------------


def inside(root: Path, relative: str) -> Path:
    """root/relative with every link resolved, refused unless it stays inside root."""
    if not relative or "\x00" in relative:
        raise Refused(400, "No path given.")
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise Refused(403, f"{relative!r} is outside the folder this UI serves.")
    return target


class Server:
    """What every route shares: the two folders, the launcher and the playground's engines."""

    def __init__(self, runs_root: Path, data_root: Path, launcher: Launcher, engine_limit: int = 2) -> None:
        self.runs_root = Path(runs_root).resolve()
        self.data_root = Path(data_root).resolve()
        self.launcher = launcher
        from tunesmith.ui.playground import Playground

        self.playground = Playground(engine_limit)

    def run_dir(self, name: str, must_exist: bool = True) -> Path:
        if not RUN_NAME.match(name):
            raise Refused(400, f"{name!r} is not a run name (letters, digits, '.', '_' and '-').")
        path = inside(self.runs_root, name)
        if must_exist and not RunDir(path).is_run():
            raise Refused(404, f"No run '{name}' in {self.runs_root}.")
        return path

    def data_file(self, relative: str) -> Path:
        path = inside(self.data_root, relative)
        if path.suffix not in DATA_SUFFIXES or not path.is_file():
            raise Refused(404, f"No data file {relative!r} in {self.data_root}.")
        if path.stat().st_size > MAX_DATA_BYTES:
            raise Refused(
                413,
                f"{relative} is {path.stat().st_size / 2**20:.0f} MiB, over the UI's {MAX_DATA_BYTES // 2**20} MiB "
                f"for a data file; check or review it with the CLI: tunesmith data check {path}",
            )
        return path

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.data_root))


def create_app(
    runs_root: Path,
    data_root: Path,
    token: str,
    launcher: Launcher | None = None,
    hosts: set[str] | None = None,
    port: int = 0,
) -> Any:
    from fastapi import FastAPI

    app = FastAPI(title="tunesmith ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = Server(runs_root, data_root, launcher or Launcher(runs_root))

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(TunesmithError)
    async def user_error(request: Request, exc: TunesmithError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    register_routes(app)
    allowed = {"127.0.0.1", "localhost", "[::1]"} | (hosts or set())
    app.add_middleware(Guard, token=token, hosts=allowed, cookie=f"tunesmith_ui_{port}")
    return app


def ui(request: Request) -> Server:
    return request.app.state.ui


# --- Routes ----------------------------------------------------------------------------------------------------


def register_routes(app: Any) -> None:
    app.get("/")(index)
    app.get("/static/{path:path}")(static)
    app.get("/api/runs")(list_runs)
    app.get("/api/runs/{name}")(one_run)
    app.get("/api/runs/{name}/stream")(stream_metrics)
    app.post("/api/runs/{name}/stop")(stop_run)
    app.post("/api/runs/{name}/resume")(resume_run)
    app.get("/api/fields")(form_fields)
    app.get("/api/files")(data_files)
    app.post("/api/prepare")(prepare_run)
    app.post("/api/launch")(launch_run)
    app.get("/api/data/check")(data_check)
    app.get("/api/review")(review_items)
    app.post("/api/review/verdict")(review_verdict)
    app.post("/api/review/apply")(review_apply)
    app.get("/api/playground")(playground_info)
    app.post("/api/playground/chat")(playground_chat)


async def index(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


async def static(path: str, request: Request) -> FileResponse:
    target = inside(STATIC, path)
    if not target.is_file():  # a folder (/static/vendor) or nothing
        raise Refused(404, f"No file {path!r} here.")
    return FileResponse(target)


def _progress(described: dict[str, Any], config: dict[str, Any], last: dict[str, Any] | None) -> float | None:
    train = config.get("train") or {}
    if described["status"] == "completed":
        return 1.0
    if train.get("max_steps"):
        return min(1.0, described["steps"] / train["max_steps"])
    if last and train.get("epochs"):
        return min(1.0, last.get("epoch", 0) / train["epochs"])
    return None


def _run_row(path: Path, launcher: Launcher) -> dict[str, Any]:
    from tunesmith.watch import describe, read_metrics

    described = describe(path)
    config = RunDir(path).read_config_fields()
    train = [r for r in read_metrics(path) if r.get("type", "train") == "train"]
    last = train[-1] if train else None
    row = {k: v for k, v in described.items() if k != "manifest"}
    row |= {
        "name": path.name,
        "status": launcher.status(path.name, described["status"]),
        "objective": config.get("objective", "sft"),
        "progress": _progress(described, config, last),
        "tokens_per_s": last.get("tokens_per_s") if last else None,
        "compared": RunDir(path).compare.is_file(),
        "launched": path.name in launcher.launches(),
    }
    return row


async def list_runs(request: Request) -> Any:
    server = ui(request)

    def collect() -> dict[str, Any]:
        launcher = server.launcher
        rows = []
        if server.runs_root.is_dir():
            for path in sorted(server.runs_root.iterdir()):
                if RunDir(path).is_run():
                    rows.append(_run_row(path, launcher))
        known = {r["name"] for r in rows}
        queue = launcher.queue()
        queued = {entry["name"] for entry in queue}
        # Launched from here and never reached a manifest: the data gate refused it, or it is starting.
        for name, launch in launcher.launches().items():
            if name not in known and name not in queued:
                starting = launch.get("exit_code") is None and launcher.is_active(name)
                rows.append({"name": name, "status": "starting" if starting else "failed", "launched": True,
                             "steps": 0, "model": None, "method": None})  # fmt: skip
        return {"runs": rows, "queue": queue, "active": launcher.active(), "max_trainings": launcher.max_trainings}

    return await asyncio.to_thread(collect)


def _log_tail(launcher: Launcher, name: str, lines: int = 60) -> str | None:
    path = launcher.log_path(name)
    if not path.is_file():
        return None
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


async def one_run(name: str, request: Request) -> Any:
    server = ui(request)
    path = server.run_dir(name, must_exist=False)
    if not RunDir(path).is_run():
        queued = [e for e in server.launcher.queue() if e["name"] == name]
        if not queued and name not in server.launcher.launches():
            raise Refused(404, f"No run '{name}' in {server.runs_root}.")
        return {"name": name, "status": "queued" if queued else "starting", "log": _log_tail(server.launcher, name)}

    def collect() -> dict[str, Any]:
        from tunesmith.evaluate.report import build_report
        from tunesmith.watch import read_metrics

        layout = RunDir(path)
        row = _run_row(path, server.launcher)
        report = build_report(path)
        records = read_metrics(path)
        events = [r for r in records if r.get("type") == "event" or r.get("spike") or r.get("overfitting")]
        summary = json.loads(layout.summary.read_text()) if layout.summary.is_file() else {}
        if summary.get("stopped"):
            events.append({"step": summary.get("steps"), "event": f"stopped: {summary['stopped']}"})
        check = json.loads(layout.check_report.read_text()) if layout.check_report.is_file() else None
        return row | {
            "config_text": layout.config.read_text() if layout.config.is_file() else "",
            "metrics": records,
            "events": events,
            "report": {k: report[k] for k in ("config", "data_check", "training", "time_and_cost")},
            "comparison": report["comparison"],
            "check": check,
            "queued": any(e["name"] == name for e in server.launcher.queue()),
            "log": _log_tail(server.launcher, name),
        }

    return await asyncio.to_thread(collect)


class ClientGone(Exception):
    """The page that followed a run went away: stop following it."""


async def stream_metrics(name: str, request: Request) -> StreamingResponse:
    """Server-sent events: every metrics record (runs.follow), then an `end` event once the run stops running."""
    from tunesmith.watch import follow, run_status

    path = ui(request).run_dir(name)
    loop = asyncio.get_running_loop()
    records: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def pause(seconds: float) -> None:
        if gone.wait(seconds):
            raise ClientGone

    def read() -> None:
        try:
            for record in follow(path, interval=0.5, sleep=pause):
                loop.call_soon_threadsafe(records.put_nowait, ("metric", record))
        except ClientGone:
            return
        except Exception as exc:  # noqa: BLE001 - the page is told, the stream ends
            loop.call_soon_threadsafe(records.put_nowait, ("error", {"error": str(exc)}))
        status = run_status(RunDir(path).read_manifest())
        loop.call_soon_threadsafe(records.put_nowait, ("end", {"status": status}))

    async def events() -> Any:
        thread = threading.Thread(target=read, name=f"follow-{name}", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(records.get(), timeout=15)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                yield f"event: {kind}\ndata: {json.dumps(finite(value), allow_nan=False)}\n\n"
                if kind == "end":
                    return
        finally:
            gone.set()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def stop_run(name: str, request: Request) -> Any:
    server = ui(request)
    server.run_dir(name, must_exist=False)
    return {"message": await asyncio.to_thread(server.launcher.stop, name)}


async def resume_run(name: str, request: Request) -> Any:
    server = ui(request)
    path = server.run_dir(name)
    from tunesmith.watch import run_status

    status = run_status(RunDir(path).read_manifest())
    if status in ("running", "completed"):
        raise Refused(409, f"Run '{name}' is {status}; only a stopped, failed or crashed run resumes.")
    place = server.launcher.enqueue(name, resume=True)
    server.launcher.tick()
    return {"message": f"queued to resume (place {place})" if place > 1 else "resuming"}


# --- New run ---------------------------------------------------------------------------------------------------


async def form_fields(request: Request) -> Any:
    from tunesmith.config import choices, leaf_fields

    fields = dict(leaf_fields())
    server = ui(request)
    return {
        "fields": [
            {
                "key": key,
                "help": fields[key].description,
                "default": fields[key].get_default(call_default_factory=True),
                "choices": choices(fields[key]),
            }
            for key in FORM_FIELDS
        ],
        "models": _models(server),
        "active": server.launcher.active(),
    }


def _models(server: Server) -> list[str]:
    """Models the form offers: the embedded ones and model folders or .gguf files inside the data folder."""
    from tunesmith.models import EMBEDDED

    found = list(EMBEDDED)
    for path in sorted(server.data_root.glob("*")) + sorted(server.data_root.glob("*/*")):
        if (path.is_dir() and (path / "config.json").is_file()) or path.suffix == ".gguf":
            found.append(server.relative(path))
    return found


async def data_files(request: Request) -> Any:
    server = ui(request)

    def collect() -> list[dict[str, Any]]:
        return list_data_files(server.data_root)

    return {"root": str(server.data_root), "files": await asyncio.to_thread(collect)}


def list_data_files(root: Path) -> list[dict[str, Any]]:
    """Data files under root, sorted, at most MAX_LISTED_FILES; hidden folders, the UI's own, model folders and
    review outputs left out. The walk stops after MAX_WALKED_ENTRIES entries, however large the folder."""
    files: list[dict[str, Any]] = []
    seen = 0
    for folder, dirs, names in os.walk(root):
        seen += len(dirs) + len(names)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != HOME)
        if "config.json" in names:
            continue  # a model folder's own JSON files
        for name in sorted(names):
            path = Path(folder) / name
            derived = name.endswith((".review.jsonl", ".reviewed.jsonl"))
            if path.suffix in DATA_SUFFIXES and not name.startswith(".") and not derived and path.is_file():
                files.append({"path": str(path.relative_to(root)), "bytes": path.stat().st_size})
                if len(files) >= MAX_LISTED_FILES:
                    return sorted(files, key=lambda f: f["path"])
        if seen >= MAX_WALKED_ENTRIES:
            break
    return sorted(files, key=lambda f: f["path"])


class RunForm(BaseModel):
    fields: dict[str, str] = Field(default_factory=dict)


def _form_config(server: Server, form: RunForm) -> Any:
    """The run config the form describes, validated as `tunesmith train` validates it, with paths confined."""
    from tunesmith.config import build_config, leaf_fields, parse_value, set_dotted
    from tunesmith.models import EMBEDDED

    known = dict(leaf_fields())
    tree: dict[str, Any] = {}
    for key, text in form.fields.items():
        if key not in FORM_FIELDS:
            raise Refused(400, f"{key!r} is not a setting of this form.")
        if text.strip() != "":
            set_dotted(tree, key, parse_value(text.strip(), known[key]))
    name = str(tree.get("name") or "")
    if not RUN_NAME.match(name):
        raise Refused(400, "Give the run a name: letters, digits, '.', '_' and '-'.")
    tree["data"] = tree.get("data") or {}
    tree["data"]["path"] = str(server.data_file(str(tree["data"].get("path") or "")))
    model = str(tree.get("model") or "")
    if model not in EMBEDDED:
        tree["model"] = str(inside(server.data_root, model))
    tree["out"] = str(server.run_dir(name, must_exist=False))
    return build_config(tree, source="the New run form")


async def prepare_run(form: RunForm, request: Request) -> Any:
    """The data check and the plan's estimate for the form's config, before anything is launched."""
    server = ui(request)
    config = _form_config(server, form)

    def collect() -> dict[str, Any]:
        from tunesmith.data.check import CheckOptions, check_data
        from tunesmith.plan.report import PlanOptions, plan_run

        options = CheckOptions(max_length=config.data.max_length, near_threshold=config.data.near_threshold)
        report = check_data(config.data.path, config.data.format, None, options, config.data.test_path)
        blocks = bool(report.errors) or (bool(report.warnings) and not config.data.allow_warnings)
        try:
            plan: dict[str, Any] | None = plan_run(config, PlanOptions()).to_dict()
            plan_error = None
        except (TunesmithError, OSError, ValueError) as exc:
            plan, plan_error = None, str(exc)
        return {
            "check": {k: v for k, v in report.to_dict().items() if k in ("examples", "errors", "warnings", "format")},
            "blocks": blocks,
            "plan": plan,
            "plan_error": plan_error,
            "exists": RunDir(config.run_dir).is_run() or config.run_dir.exists(),
            "active": server.launcher.active(),
            "queue": server.launcher.queue(),
        }

    return await asyncio.to_thread(collect)


async def launch_run(form: RunForm, request: Request) -> Any:
    from tunesmith.config import dump_config

    server = ui(request)
    config = _form_config(server, form)
    if config.run_dir.exists():
        raise Refused(409, f"{config.run_dir} already exists; choose another name.")
    place = server.launcher.enqueue(str(config.name), dump_config(config))
    server.launcher.tick()
    waiting = len(server.launcher.queue())
    return {"name": config.name, "queued": waiting > 0, "place": place if waiting else 0}


# --- Data: the check report and the review ---------------------------------------------------------------------


async def data_check(path: str, request: Request) -> Any:
    server = ui(request)
    data = server.data_file(path)

    def collect() -> dict[str, Any]:
        from tunesmith.data.check import answer_text, check_parsed, prompt_text
        from tunesmith.data.formats import parse_file

        parsed = parse_file(data)
        report, _ = check_parsed(parsed)
        by_line = {c.line: c for c in parsed.conversations}
        shown = {line for cluster in report.exact_duplicates + report.near_duplicates for line in cluster}
        shown |= {line for conflict in report.conflicts for line in conflict.get("lines", [])}
        return {
            "path": path,
            "report": report.to_dict(),
            "examples": {
                line: {"prompt": prompt_text(by_line[line]), "answer": answer_text(by_line[line])}
                for line in sorted(shown)
                if line in by_line
            },
            "lengths": {
                "prompt_words": [len(prompt_text(c).split()) for c in parsed.conversations],
                "answer_words": [len(answer_text(c).split()) for c in parsed.conversations],
            },
        }

    return await asyncio.to_thread(collect)


def _review_sample(data: Path, sample: int, seed: int) -> list[Any]:
    from tunesmith.data.review import sample_items

    return sample_items(data, sample, seed)


async def review_items(path: str, request: Request, sample: int = 50, seed: int = 42) -> Any:
    """The same sample `tunesmith data review --sample N --seed S` shows, with the verdicts so far."""
    data = ui(request).data_file(path)

    def collect() -> dict[str, Any]:
        from tunesmith.data.check import answer_text, prompt_text
        from tunesmith.data.review import load_verdicts, summarise, verdict_path

        items = _review_sample(data, sample, seed)
        verdicts = load_verdicts(data)
        return {
            "path": path,
            "verdicts_file": verdict_path(data).name,
            "items": [
                {
                    "hash": item.hash,
                    "line": item.conversation.line,
                    "label": item.label,
                    "prompt": prompt_text(item.conversation),
                    "answer": answer_text(item.conversation),
                    "verdict": verdicts.get(item.hash),
                }
                for item in items
            ],
            "summary": asdict(summarise(data, items)),
        }

    return await asyncio.to_thread(collect)


class VerdictForm(BaseModel):
    path: str
    hash: str
    verdict: str
    note: str = Field("", max_length=MAX_NOTE_CHARS)
    edited: str | None = Field(None, max_length=MAX_EDIT_CHARS)
    sample: int = 50
    seed: int = 42


async def review_verdict(form: VerdictForm, request: Request) -> Any:
    from tunesmith.data.review import record_verdict, summarise

    data = ui(request).data_file(form.path)

    def record() -> dict[str, Any]:
        items = _review_sample(data, form.sample, form.seed)
        item = next((i for i in items if i.hash == form.hash), None)
        if item is None:
            raise Refused(404, "That example is not in this review's sample.")
        if form.verdict == "edit" and not (form.edited or "").strip():
            raise Refused(400, "An edit needs the new answer.")
        record_verdict(data, item, form.verdict, form.note, form.edited if form.verdict == "edit" else None)
        return {"summary": asdict(summarise(data, items))}

    return await asyncio.to_thread(record)


class ApplyForm(BaseModel):
    path: str
    overwrite: bool = False


async def review_apply(form: ApplyForm, request: Request) -> Any:
    from tunesmith.data.review import apply_review

    server = ui(request)
    data = server.data_file(form.path)
    summary = await asyncio.to_thread(apply_review, data, None, form.overwrite)
    written = Path(str(summary.written))
    return asdict(summary) | {"written": server.relative(written)}


# --- Playground -------------------------------------------------------------------------------------------------


async def playground_info(request: Request) -> Any:
    server = ui(request)

    def collect() -> list[dict[str, Any]]:
        from tunesmith.watch import find_runs

        return [
            {"name": Path(r["dir"]).name, "model": r["model"], "method": r["method"]}
            for r in find_runs(server.runs_root)
            if r["status"] == "completed"
        ]

    return {
        "runs": await asyncio.to_thread(collect),
        "training": server.launcher.active(),
        "loaded": server.playground.loaded(),
    }


class ChatForm(BaseModel):
    runs: list[str] = Field(min_length=1, max_length=8)
    model: str
    messages: list[dict[str, str]] = Field(min_length=1, max_length=64)
    max_tokens: int = Field(64, gt=0, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=2.0)


async def playground_chat(form: ChatForm, request: Request) -> StreamingResponse:
    """One model's answer to the conversation, streamed as server-sent events of text deltas."""
    server = ui(request)
    run_dirs = [server.run_dir(name) for name in form.runs]
    if form.model != "base" and form.model not in form.runs:
        raise Refused(400, f"{form.model!r} is neither 'base' nor one of the runs chosen.")
    events = await server.playground.answer(run_dirs, form.model, form.messages, form.max_tokens, form.temperature)

    async def stream() -> Any:
        async for kind, value in events:
            yield f"event: {kind}\ndata: {json.dumps(value)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
