"""File I/O shared by the package: JSON and JSON-lines reading whose errors name the file (and line), and atomic
writes.

An atomic write goes to a temporary file next to the target (``<name>.<pid>.part``) that is renamed over the target
only once it is complete, so a killed process never leaves a half-written file under the final name, and two
processes writing the same file never share a temporary file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


# --------------------------------------------------------------------------- reading
def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file; missing file or malformed JSON raise with the path (and line/column) in the message."""
    path = require_file(path, what)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"malformed JSON in {what} {path}: line {err.lineno} column {err.colno}: {err.msg}"
            ) from None


def iter_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> Iterator[tuple[int, Any]]:
    """Yield (line_number, object) for each non-blank line; malformed lines raise with path and line number."""
    path = require_file(path, what)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"malformed JSON in {what} {path} at line {lineno}: {err.msg}") from None


# --------------------------------------------------------------------------- atomic writing
@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[str]]:
    """Open a temporary file next to ``path`` for UTF-8 text writing (``\\n`` line ends); on a clean exit rename it
    over ``path``, on an exception delete it and re-raise. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            yield f
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(obj: Any, path: str | os.PathLike, *, indent: int | None = None, sort_keys: bool = False) -> None:
    """Write ``obj`` as one JSON document plus a final newline, atomically (``json.dump`` options otherwise default:
    ASCII escapes, ``", "`` / ``": "`` separators)."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys)
        f.write("\n")


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Write one JSON object per line (``json.dumps`` defaults, keys in insertion order), atomically; return the
    count."""
    count = 0
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record))
            f.write("\n")
            count += 1
    return count
