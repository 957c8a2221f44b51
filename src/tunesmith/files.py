"""Writing files and directories so that a reader never sees half of one, and nothing is lost by accident.

Everything that replaces an existing path goes through here: it refuses a path tunesmith did not write
(and the filesystem root, the home folder, the current folder and its parents), writes the new content
completely before the old one is removed, and never deletes a temporary path it did not create itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from tunesmith.errors import TunesmithError

# Written into every folder tunesmith creates as an export; its presence makes the folder replaceable.
MARKER = ".tunesmith.json"


def cache_root() -> Path:
    """tunesmith's cache folder (converted models, tokenized data, the matmul probe, the ledger below)."""
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


def _ledger() -> Path:
    return cache_root() / "written-files.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity inside it replaced by None, so that it is valid JSON for any reader
    (JSON.parse refuses the `Infinity` Python's json writes; a grad norm is inf after an fp16 loss-scale backoff)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    """One JSONL line of `record`, non-finite numbers written as null."""
    return json.dumps(finite(record), ensure_ascii=False, allow_nan=False) + "\n"


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[TextIO]:
    """A text handle whose content replaces `path` in one rename when the block ends without an error.

    A reader sees the old file or the new one, never half; the rename replaces a symbolic link at `path`
    itself, so a link planted in a downloaded run folder is never written through.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Replace `path` with the file `write(tmp)` makes, in one rename (a plot, say, that a library writes itself);
    as `replacing`, a symbolic link at `path` is replaced, never written through."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small text file in one rename (see `replacing`)."""
    with replacing(path) as handle:
        handle.write(text)


def write_json(path: Path, value: Any) -> None:
    """Replace a JSON file in a run folder in one rename; NaN and infinity are written as null (see `finite`)."""
    write_text_atomic(path, json.dumps(finite(value), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def own_dir(path: Path) -> Path:
    """Create a folder tunesmith writes into (a run's eval/, say); refuse one that is a symbolic link."""
    if path.is_symlink():
        raise TunesmithError(
            f"{path} is a symbolic link; tunesmith never writes through a link in a run or data folder. "
            "Remove the link and run again."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_append(path: Path) -> TextIO:
    """Open a log file (metrics, review verdicts) for appending, creating it; never through a symbolic link.

    A run or data folder may come from someone else: a link planted as `metrics.jsonl` must not make tunesmith
    append to whatever it points at.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise TunesmithError(
                f"{path} is a symbolic link; tunesmith never writes through a link in a run or data folder. "
                "Remove the link (or replace it with a plain file) and run again."
            ) from None
        raise TunesmithError(f"Cannot write {path}: {exc.strerror}.") from None
    return os.fdopen(fd, "a", encoding="utf-8")


def append_text(path: Path, text: str) -> None:
    with open_append(path) as handle:
        handle.write(text)


def protected_reason(path: Path) -> str | None:
    """Why a path may never be replaced whoever wrote it, or None."""
    resolved = path.expanduser().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the filesystem root"
    if resolved == Path.home().resolve():
        return "it is your home folder"
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current folder or one of its parents"
    return None


def check_replaceable(path: Path, ours: bool, what: str) -> None:
    """Raise unless `path` may be replaced under --overwrite: not protected, and written by tunesmith."""
    reason = protected_reason(path)
    if reason is None and not ours:
        reason = f"it is not {what} that tunesmith wrote"
    if reason:
        raise TunesmithError(
            f"Refusing to replace {path}: {reason}, so --overwrite does not apply to it. "
            "Choose another output path, or move it away yourself."
        )


def is_marked(folder: Path) -> bool:
    """True for a folder tunesmith created as an export (it holds our marker file)."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("written_by") == "tunesmith"
    except (OSError, ValueError, AttributeError):
        return False


def mark(folder: Path, kind: str) -> None:
    write_text_atomic(folder / MARKER, json.dumps({"written_by": "tunesmith", "kind": kind}) + "\n")


def save_atomic(target: Path, write: Callable[[Path], None], replace: bool = False) -> None:
    """Write a directory under a fresh temporary name beside `target`, then rename it into place.

    A crash leaves at most a hidden `.NAME.*.partial` folder, never a half-written `target`. With
    `replace`, an existing `target` is removed only after the new one is complete and renamed in; the
    caller decides (check_replaceable) whether it may be replaced at all.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    staged, old = scratch / "new", scratch / "old"
    try:
        write(staged)
        if target.exists():
            if not replace:
                raise TunesmithError(f"{target} already exists; pass --overwrite to replace it.")
            os.rename(target, old)
        os.rename(staged, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.rename(old, target)  # put the previous version back
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    shutil.rmtree(scratch, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: so a rename inside it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(staged: Path, target: Path) -> None:
    """Move a completely written folder into place: its files flushed, then renamed to `target` and the parent
    flushed. Whatever is at `target` is a leftover the caller has judged incomplete (a checkpoint folder without
    its last file) and is removed first."""
    for item in staged.iterdir():
        fsync_path(item)
    if target.exists():
        shutil.rmtree(target)
    os.rename(staged, target)
    fsync_path(target.parent)


def _written() -> dict[str, str]:
    try:
        found = json.loads(_ledger().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def written_by_us(path: Path) -> bool:
    """True when the file holds exactly what tunesmith last wrote there (edited since: no longer ours)."""
    recorded = _written().get(str(path.expanduser().resolve()))
    return recorded is not None and path.is_file() and sha256_file(path) == recorded


def check_file_target(path: Path, overwrite: bool, what: str) -> None:
    """Raise unless `path` is free, or --overwrite was given and tunesmith wrote what is there now."""
    if not path.exists():
        return
    if not overwrite:
        raise TunesmithError(f"{path} already exists; pass --overwrite to replace it, or choose another file.")
    if path.is_dir():
        raise TunesmithError(f"{path} is a folder; give a file name.")
    check_replaceable(path, written_by_us(path), what)


def write_file_atomic(path: Path, write: Callable[[Path], None], overwrite: bool, what: str) -> None:
    """Write one output file through a temporary file; replace an existing one only if tunesmith wrote it.

    The file's hash is recorded in the user cache, which is how a later --overwrite knows it is ours.
    """
    path = Path(path)
    check_file_target(path, overwrite, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, write)
    record = _written() | {str(path.resolve()): sha256_file(path)}
    ledger = _ledger()
    ledger.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(ledger, json.dumps(record, indent=1))
