"""The transcript file format (JSON, versioned) and the Markdown export.

A transcript is one JSON object (UTF-8)::

    {
      "format": "fmchat-transcript",
      "version": 1,
      "session": {"id": str, "title": str, "title_set": bool, "created": float, "updated": float,
                  "model": str, "backend": str, "settings": {...}, "system": str | null,
                  "window_start": int, "memory_note": str},
      "messages": [{"role": "user" | "assistant" | "system", "content": str, "created": float,
                    "cancelled": bool, "stats": {...} | null, "token_ids": [int, ...] | null}, ...]
    }

Times are unix seconds. Export then import gives back the same session (and the same export), byte for byte.
Import checks everything before writing anything.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from pathlib import Path

from .records import ID_RE, SessionRecord, StoredMessage

FORMAT = "fmchat-transcript"
VERSION = 1
MAX_IMPORT_BYTES = 50 * 1024 * 1024  # larger files are refused before they are read
ROLES = ("system", "user", "assistant")


class TranscriptError(ValueError):
    """The file is not an fmchat transcript this version can import: one line for the user."""


def to_dict(rec: SessionRecord) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "session": {
            "id": rec.id,
            "title": rec.title,
            "title_set": rec.title_set,
            "created": rec.created,
            "updated": rec.updated,
            "model": rec.model,
            "backend": rec.backend,
            "settings": rec.settings,
            "system": rec.system,
            "window_start": rec.window_start,
            "memory_note": rec.memory_note,
        },
        "messages": [
            {
                "role": m.role,
                "content": m.content,
                "created": m.created,
                "cancelled": m.cancelled,
                "stats": m.stats,
                "token_ids": m.token_ids,
            }
            for m in rec.messages
        ],
    }


def to_json(rec: SessionRecord) -> str:
    return json.dumps(to_dict(rec), ensure_ascii=False, indent=2) + "\n"


def _fmt_time(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def to_markdown(rec: SessionRecord) -> str:
    out = [f"# {rec.title or 'Untitled chat'}", ""]
    meta = [f"- session: `{rec.id}`", f"- model: {rec.model or 'n/a'} ({rec.backend or 'n/a'})",
            f"- created: {_fmt_time(rec.created)}, updated: {_fmt_time(rec.updated)}"]  # fmt: skip
    out += meta + [""]
    if rec.system:
        out += ["## System", "", rec.system, ""]
    for m in rec.messages:
        head = {"user": "You", "assistant": "Assistant", "system": "System"}[m.role]
        if m.cancelled:
            head += " (cancelled)"
        out += [f"## {head}", "", m.content if m.content else "_(empty)_", ""]
        s = m.stats or {}
        if m.role == "assistant" and s:
            bits = []
            if s.get("generated_tokens") is not None:
                bits.append(f"{s['generated_tokens']} tokens")
            if s.get("ttft_ms"):
                bits.append(f"TTFT {s['ttft_ms']:.0f} ms")
            if s.get("decode_tok_s"):
                bits.append(f"decode {s['decode_tok_s']:.1f} tok/s")
            if bits:
                out += [f"_{' · '.join(bits)}_", ""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------- import
def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise TranscriptError(f"{where}: {what}")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def from_dict(data) -> SessionRecord:
    """Validate a parsed transcript and build the record (TranscriptError on the first problem)."""
    _need(isinstance(data, dict), "transcript", "expected a JSON object")
    _need(data.get("format") == FORMAT, "transcript", f'not an fmchat transcript ("format" must be "{FORMAT}")')
    v = data.get("version")
    if v != VERSION:
        newer = isinstance(v, int) and not isinstance(v, bool) and v > VERSION
        raise TranscriptError(
            f"transcript: version {v!r} is not supported (this fmchat reads version {VERSION}"
            + ("; it was written by a newer fmchat)" if newer else ")")
        )
    s = data.get("session")
    _need(isinstance(s, dict), "session", "expected an object")
    for key, typ in (("id", str), ("title", str), ("model", str), ("backend", str), ("memory_note", str)):
        _need(isinstance(s.get(key), typ), f"session.{key}", "expected a string")
    _need(ID_RE.fullmatch(s["id"]) is not None, "session.id", "expected 1-64 letters, digits, '-' or '_'")
    _need(isinstance(s.get("title_set"), bool), "session.title_set", "expected true or false")
    for key in ("created", "updated"):
        _need(_num(s.get(key)), f"session.{key}", "expected a number (unix seconds)")
    _need(isinstance(s.get("settings"), dict), "session.settings", "expected an object")
    _need(s.get("system") is None or isinstance(s.get("system"), str), "session.system", "expected a string or null")
    ws = s.get("window_start")
    _need(
        isinstance(ws, int) and not isinstance(ws, bool) and ws >= 0, "session.window_start", "expected an integer >= 0"
    )
    msgs = data.get("messages")
    _need(isinstance(msgs, list), "messages", "expected a list")
    _need(ws <= len(msgs), "session.window_start", "beyond the last message")
    out = []
    for i, m in enumerate(msgs):
        w = f"messages[{i}]"
        _need(isinstance(m, dict), w, "expected an object")
        _need(m.get("role") in ROLES, f"{w}.role", f"expected one of {', '.join(ROLES)}")
        _need(isinstance(m.get("content"), str), f"{w}.content", "expected a string")
        _need(_num(m.get("created")), f"{w}.created", "expected a number (unix seconds)")
        _need(isinstance(m.get("cancelled"), bool), f"{w}.cancelled", "expected true or false")
        _need(m.get("stats") is None or isinstance(m.get("stats"), dict), f"{w}.stats", "expected an object or null")
        ids = m.get("token_ids")
        _need(ids is None or (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)),
              f"{w}.token_ids", "expected a list of non-negative integers or null")  # fmt: skip
        out.append(StoredMessage(m["role"], m["content"], m["created"], m["cancelled"], m["stats"], ids))
    return SessionRecord(
        id=s["id"], title=s["title"], created=s["created"], updated=s["updated"], model=s["model"], backend=s["backend"],
        settings=s["settings"], system=s["system"], window_start=ws, memory_note=s["memory_note"], title_set=s["title_set"],
        messages=out,
    )  # fmt: skip


def read_file(path: Path) -> SessionRecord:
    """Read and validate a transcript file; refuses oversized, unreadable, truncated or malformed files."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise TranscriptError(f"{path}: no such file") from None
    except OSError as exc:
        raise TranscriptError(f"{path}: cannot read ({exc.strerror})") from None
    if not path.is_file():
        raise TranscriptError(f"{path}: not a file")
    if size > MAX_IMPORT_BYTES:
        raise TranscriptError(
            f"{path}: {size / 1024**2:.1f} MiB is over the {MAX_IMPORT_BYTES // 1024**2} MiB import limit"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        raise TranscriptError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_IMPORT_BYTES:  # grew while we looked
        raise TranscriptError(f"{path}: over the {MAX_IMPORT_BYTES // 1024**2} MiB import limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TranscriptError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise TranscriptError(f"{path}: empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TranscriptError(
            f"{path}: not valid JSON, truncated or malformed ({exc.msg} at line {exc.lineno})"
        ) from None
    except RecursionError:
        raise TranscriptError(f"{path}: JSON nested too deeply") from None
    try:
        return from_dict(data)
    except TranscriptError as exc:
        raise TranscriptError(f"{path}: {exc}") from None


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with user-only permissions (0600), atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
