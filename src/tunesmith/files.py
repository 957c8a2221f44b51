"""Writing directories so that a reader never sees half of one."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def save_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Write a directory under a temporary name, then rename it into place.

    A crash leaves at most a `.partial` directory, never a half-written `target`.
    """
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    partial.rename(target)
