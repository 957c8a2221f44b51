"""Every served request in SQLite: what was asked and answered, how long it took, and any feedback.

One file per server (default RUN/serve/requests.sqlite), readable by `tunesmith monitor` and by any
SQLite tool. Writes go through one connection under a lock; WAL mode lets monitor read while the
server writes. A write that fails raises sqlite3.Error: the server counts it and still answers.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

JSON_COLUMNS = ("tools", "tool_calls")  # the tools a chat request offered; the calls of its answer (OpenAI's shape)
CLIENT_GONE = 499  # nginx's status for a client that closed the connection before the answer

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT,
    status INTEGER NOT NULL,
    latency_ms REAL,
    first_token_ms REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    messages TEXT,
    output TEXT,
    finish_reason TEXT,
    error TEXT,
    tools TEXT,
    tool_calls TEXT
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL REFERENCES requests(id),
    created REAL NOT NULL,
    rating REAL,
    correction TEXT,
    comment TEXT
);
CREATE INDEX IF NOT EXISTS requests_created ON requests(created);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id);
"""


class RequestLog:
    def __init__(self, path: str | Path, busy_timeout_s: float = 1.0) -> None:
        """busy_timeout_s: how long a write waits for another process's lock before it fails; answers wait on
        the write, and WAL readers such as monitor never hold it, so a longer wait would only delay them."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self._add_columns()

    def _add_columns(self) -> None:
        """A log written before tool calling gets their columns (JSON, like messages), so its server keeps going."""
        with self.lock, self.db:
            have = {row[1] for row in self.db.execute("PRAGMA table_info(requests)")}
            for column in JSON_COLUMNS:
                if column not in have:
                    self.db.execute(f"ALTER TABLE requests ADD COLUMN {column} TEXT")

    def record(self, **row: Any) -> None:
        for column in ("messages", *JSON_COLUMNS):
            if isinstance(row.get(column), (list, dict)):
                row[column] = json.dumps(row[column], ensure_ascii=False)
        row.setdefault("created", time.time())
        columns = ", ".join(row)
        with self.lock, self.db:
            self.db.execute(
                f"INSERT INTO requests ({columns}) VALUES ({', '.join('?' * len(row))})", list(row.values())
            )

    def has(self, request_id: str) -> bool:
        with self.lock:
            return self.db.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone() is not None

    def feedback_count(self, request_id: str) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM feedback WHERE request_id = ?", (request_id,)).fetchone()[0]

    def feedback(self, request_id: str, rating: float | None, correction: str | None, comment: str | None) -> int:
        with self.lock, self.db:
            cursor = self.db.execute(
                "INSERT INTO feedback (request_id, created, rating, correction, comment) VALUES (?, ?, ?, ?, ?)",
                (request_id, time.time(), rating, correction, comment),
            )
            return int(cursor.lastrowid)

    def close(self) -> None:
        with self.lock:
            self.db.close()


def read_requests(path: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """All logged requests (newest last), read-only."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM requests WHERE created >= ? ORDER BY created", (since,)).fetchall()
    return [dict(row) for row in rows]


def read_feedback(path: Path) -> list[dict[str, Any]]:
    """Feedback joined with the request it rates."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT f.*, r.model, r.messages, r.output, r.endpoint, r.tools, r.tool_calls FROM feedback f "
            "JOIN requests r ON r.id = f.request_id ORDER BY f.created"
        ).fetchall()
    return [dict(row) for row in rows]
