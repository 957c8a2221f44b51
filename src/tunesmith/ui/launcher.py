"""Training processes started from the browser: a queue kept on disk, one training at a time by default.

A launch is `python -m tunesmith run CONFIG` in a session of its own, so it outlives the UI and Ctrl-C in the UI's
terminal never reaches it; what became of a run is its own manifest (watch.run_status). Only what a run directory
cannot know yet is kept here, in RUNS/.tunesmith-ui/: the queue, the config of a run not started, each launch's log,
process and exit status. A restarted UI reads them back, and two UIs on one runs folder share them: every change to
the queue and every launch holds RUNS/.tunesmith-ui/queue.lock, so `--max-trainings` holds across both. A process is
known by its pid, host and start time (watch.is_process), never by a pid alone. Nothing here writes inside a run
directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from tunesmith.errors import TunesmithError
from tunesmith.files import open_append, write_text_atomic
from tunesmith.rundir import RunDir
from tunesmith.trust import LAUNCHED_BY_UI
from tunesmith.watch import is_process, on_this_host, process_identity, run_status, running_here

HOME = ".tunesmith-ui"
# What a run the UI starts gets: unbuffered logs; no folder of the run on Python's import path (PYTHONSAFEPATH:
# a `torch.py` in a downloaded run folder is never imported); and the mark that makes it refuse any code a
# config names (see tunesmith.trust), since the UI's configs come from a browser, not a command line.
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1", LAUNCHED_BY_UI: "1"}


class Launcher:
    def __init__(self, runs_root: Path, max_trainings: int = 1, python: str = sys.executable) -> None:
        self.runs_root = Path(runs_root).resolve()
        self.home = self.runs_root / HOME
        self.max_trainings = max(1, max_trainings)
        self.python = python
        self.children: dict[str, subprocess.Popen] = {}
        self.lock = threading.RLock()  # this UI's threads; `locked()` adds the lock between processes
        self.file_lock = FileLock(str(self.home / "queue.lock"), thread_local=False)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    # Files of the UI's own, beside the runs.
    def log_path(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def config_path(self, name: str) -> Path:
        return self.home / "configs" / f"{name}.yaml"

    @property
    def queue_file(self) -> Path:
        return self.home / "queue.json"

    @property
    def launches_file(self) -> Path:
        return self.home / "launches.json"

    def _read(self, path: Path, empty: Any) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return empty

    def _write(self, path: Path, value: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(value, indent=2))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the queue: this UI's other threads and every other UI on the same runs folder wait."""
        with self.lock:
            self.home.mkdir(parents=True, exist_ok=True)
            with self.file_lock:
                yield

    def queue(self) -> list[dict[str, Any]]:
        return self._read(self.queue_file, [])

    def launches(self) -> dict[str, dict[str, Any]]:
        return self._read(self.launches_file, {})

    def _record_launch(self, name: str, **fields: Any) -> None:
        launches = self.launches()
        launches[name] = launches.get(name, {}) | fields
        self._write(self.launches_file, launches)

    def enqueue(self, name: str, config_text: str | None = None, resume: bool = False) -> int:
        """Queue a new run (its config YAML) or the resumption of an existing one; returns its place (1 = next)."""
        child = self.children.get(name)
        if resume and child is not None and not self._training(name):
            # Its manifest already says it stopped; the process is writing its last lines and exiting.
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        with self.locked():
            queue = self.queue()
            if any(entry["name"] == name for entry in queue) or self.is_active(name):
                raise TunesmithError(f"Run '{name}' is already queued or running.")
            if config_text is not None:
                path = self.config_path(name)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, config_text)
            queue.append({"name": name, "resume": resume, "queued": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            self._write(self.queue_file, queue)
            return len(queue)

    def cancel(self, name: str) -> bool:
        """Take a run off the queue; False when it was not waiting there."""
        with self.locked():
            queue = self.queue()
            kept = [entry for entry in queue if entry["name"] != name]
            if len(kept) == len(queue):
                return False
            self._write(self.queue_file, kept)
            return True

    def _training(self, name: str) -> bool:
        run = RunDir(self.runs_root / name)
        return run.is_run() and run_status(run.read_manifest()) == "running"

    def _launched_live(self, name: str) -> bool:
        """A launch recorded by this UI or another on the same folder whose process still runs (identity-checked)."""
        launch = self.launches().get(name, {})
        return launch.get("exit_code") is None and is_process(launch)

    def is_active(self, name: str) -> bool:
        child = self.children.get(name)
        return (child is not None and child.poll() is None) or self._training(name) or self._launched_live(name)

    def status(self, name: str, recorded: str) -> str:
        """A run's status as the Runs page shows it: its manifest's, unless it is waiting here or a resume this UI
        launched has not yet rewritten the manifest of the stop before it."""
        if any(entry["name"] == name for entry in self.queue()):
            return "queued"
        child = self.children.get(name)
        resuming = child is not None and child.poll() is None and self.launches().get(name, {}).get("resume")
        return "starting" if resuming and recorded not in ("running", "completed") else recorded

    def active(self) -> list[str]:
        """Trainings using this machine now: this UI's live children, launches of any UI on this folder whose
        process lives, and runs whose manifest says running here (a run running on another host never counts)."""
        names = {name for name, child in self.children.items() if child.poll() is None}
        names |= {name for name in self.launches() if self._launched_live(name)}
        if self.runs_root.is_dir():
            for path in self.runs_root.iterdir():
                run = RunDir(path)
                try:
                    if run.is_run() and running_here(run.read_manifest()):
                        names.add(path.name)
                except (OSError, ValueError):
                    continue  # a manifest being replaced; seen next time
        return sorted(names)

    def stop(self, name: str) -> str:
        """Cancel a queued run, or stop a running one the way Ctrl-C does (SIGINT: it checkpoints and exits).

        Only a process that is the run's (pid, host and start time match) is signalled; a pid the system has since
        given to another process is left alone."""
        if self.cancel(name):
            return "removed from the queue"
        run = RunDir(self.runs_root / name)
        manifest = run.read_manifest() if run.is_run() else {}
        if manifest.get("status") == "running" and not on_this_host(manifest):
            raise TunesmithError(f"Run '{name}' runs on {manifest['host']}; stop it there.")
        pid = manifest.get("pid") if running_here(manifest) else None
        if pid is None and name in self.children and self.children[name].poll() is None:
            pid = self.children[name].pid  # started here, no manifest yet
        if pid is None and self._launched_live(name):
            pid = self.launches()[name]["pid"]  # started by another UI on this folder, no manifest yet
        if not isinstance(pid, int):
            raise TunesmithError(f"Run '{name}' is not running.")
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            raise TunesmithError(f"Run '{name}' is not running: its process has just ended.") from None
        except PermissionError:
            raise TunesmithError(
                f"Run '{name}' (pid {pid}) belongs to another user; stop it as that user (kill -INT {pid})."
            ) from None
        return "stopping: the current step finishes and a checkpoint is written"

    def tick(self) -> None:
        """Reap finished children, then start queued runs while fewer than max_trainings are active."""
        with self.locked():
            for name, child in list(self.children.items()):
                code = child.poll()
                if code is not None:
                    del self.children[name]
                    self._record_launch(name, exit_code=code, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            while len(self.active()) < self.max_trainings:
                queue = self.queue()
                if not queue:
                    return
                entry, rest = queue[0], queue[1:]
                self._write(self.queue_file, rest)
                self._start(entry)

    def _start(self, entry: dict[str, Any]) -> None:
        name = entry["name"]
        run_dir = self.runs_root / name
        if entry.get("resume"):
            config_file = RunDir(run_dir).config
            out = str(RunDir(run_dir).read_config_fields().get("out") or run_dir)
            cwd = working_dir(run_dir, out)
            command = [self.python, "-m", "tunesmith", "run", str(config_file), "--resume", "--quiet"]
        else:
            cwd = self.runs_root
            command = [self.python, "-m", "tunesmith", "run", str(self.config_path(name)), "--quiet"]
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open_append(log) as handle:
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            # A session of its own: the UI's Ctrl-C does not stop it, and it outlives the UI.
            child = subprocess.Popen(
                command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=os.environ | CHILD_ENV,
            )  # fmt: skip
        self.children[name] = child
        self._record_launch(
            name, **process_identity(child.pid), resume=bool(entry.get("resume")), exit_code=None,
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )  # fmt: skip

    def start(self, interval: float = 0.5) -> None:
        def loop() -> None:
            while not self.stopping.wait(interval):
                try:
                    self.tick()
                except Exception as exc:  # noqa: BLE001 - the queue must keep going; the log says why
                    print(f"tunesmith ui: launcher: {exc}", file=sys.stderr)

        self.thread = threading.Thread(target=loop, name="tunesmith-ui-launcher", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop starting runs; those already started keep training."""
        self.stopping.set()


def working_dir(run_dir: Path, out: str) -> Path:
    """The folder a run was started from, so that its config's relative out (and data paths) mean the same again."""
    parts = Path(out).parts
    if Path(out).is_absolute() or not parts:
        return run_dir.resolve().parent
    resolved = run_dir.resolve()
    if resolved.parts[-len(parts) :] == parts:
        return Path(*resolved.parts[: -len(parts)])
    return resolved.parent
