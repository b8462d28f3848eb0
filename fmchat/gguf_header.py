"""Values from a GGUF file's header, read with the standard library only (no tensors touched, no gguf package):
``gguf_general`` (the ``general.*`` scalars and strings, for listings and store names) and ``gguf_metadata`` (any
keys, arrays included, in one pass: the chat-template choice reads the vocabulary with it). A leaf module: the
templates and the model stores both read headers through it."""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection
from pathlib import Path

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 1 << 24


def _read(f, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)


def _read_string(f, keep: bool = True) -> str | None:
    (n,) = _read(f, "<Q")
    if n > _MAX_STRING:
        raise ValueError("implausible GGUF string")
    if not keep:
        f.seek(n, 1)
        return None
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated GGUF header")
    return data.decode("utf-8", "replace")


def _read_value(f, vtype: int, keep: bool):
    if vtype == _STRING:
        return _read_string(f, keep)
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])[0]
    raise ValueError(f"unknown GGUF value type {vtype}")  # (arrays go through _read_array)


def _read_array(f, keep: bool) -> list | None:
    """A GGUF array value (after its type tag): a list of its items, or None when not ``keep`` (skipped)."""
    etype, count = _read(f, "<IQ")
    if etype in _SCALARS:
        size = struct.calcsize(_SCALARS[etype])
        if not keep:
            f.seek(count * size, 1)
            return None
        data = f.read(count * size)
        if len(data) != count * size:
            raise ValueError("truncated GGUF header")
        return list(struct.unpack(f"<{count}{_SCALARS[etype][1]}", data))
    if etype != _STRING:
        items = [_read_array(f, keep) if etype == _ARRAY else _read_value(f, etype, keep) for _ in range(count)]
        return items if keep else None
    # arrays of strings (a vocabulary: 262k of them in Gemma 3) are the bulk of a header: one read per length and
    # one per string, decoded only when kept
    read, unpack, items = f.read, struct.Struct("<Q").unpack, []
    for _ in range(count):
        head = read(8)
        if len(head) != 8:
            raise ValueError("truncated GGUF header")
        (n,) = unpack(head)
        if n > _MAX_STRING:
            raise ValueError("implausible GGUF string")
        if keep:
            data = read(n)
            if len(data) != n:
                raise ValueError("truncated GGUF header")
            items.append(data.decode("utf-8", "replace"))
        else:
            f.seek(n, 1)
    return items if keep else None


def _walk(path: Path, keep: Callable[[str], bool], done: Callable[[], bool], arrays: bool):
    """The ``(key, value)`` pairs of a GGUF header (v2/v3, little-endian) whose key ``keep`` accepts, in file order,
    until ``done()`` (asked before each item) or the header ends; other values are skipped unparsed, arrays too
    unless ``arrays``. Raises ValueError (or OSError) for a file it cannot read."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        (version,) = _read(f, "<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not read here")
        _, n_kv = _read(f, "<QQ")
        for _ in range(n_kv):
            if done():
                return
            key = _read_string(f) or ""
            (vtype,) = _read(f, "<I")
            kept = keep(key)
            value = _read_array(f, kept and arrays) if vtype == _ARRAY else _read_value(f, vtype, kept)
            if kept and value is not None:
                yield key, value


def gguf_metadata(path: Path, keys: Collection[str]) -> dict[str, object]:
    """The values of ``keys`` in a GGUF header (v2/v3, little-endian), read in one pass that stops once every key is
    seen: strings, numbers, and arrays of them as lists; a key the file lacks is absent. No tensor is touched, and
    nothing else is parsed into objects (gguf's GGUFReader builds numpy views of every item of every array: seconds
    for a large vocabulary). Raises ValueError (or OSError) for a file it cannot read."""
    want: set[str] = set(keys)
    out: dict[str, object] = {}
    for key, value in _walk(path, want.__contains__, lambda: want <= out.keys(), arrays=True):
        out[key] = value
    return out


def gguf_general(path: Path, want: tuple[str, ...] = ("general.name", "general.architecture")) -> dict[str, object]:
    """The ``general.*`` scalar and string values of a GGUF header, read until every key in ``want`` is seen;
    {} for a file that is not a readable GGUF (v2/v3, little-endian)."""
    out: dict[str, object] = {}
    try:
        general = _walk(path, lambda k: k.startswith("general."), lambda: all(k in out for k in want), arrays=False)
        for key, value in general:
            out[key] = value
    except (OSError, ValueError, struct.error):
        pass
    return out
