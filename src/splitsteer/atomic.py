"""Atomic file writes: a temp file in the target's folder, then a rename (and JSON reads
that fail in one line).

An interrupted run therefore never leaves a half-written output behind. Every file splitsteer
writes goes through here (folders built whole go through :func:`scratch_dir`), so the logic
lives in one place.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# mkstemp/mkdtemp create 0600/0700 entries; outputs should get the usual umask-based modes.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@contextmanager
def scratch_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp folder beside ``target`` to build a whole folder in, then ``os.replace`` it onto
    ``target``; whatever is left of it (an interruption, an error) is removed on exit."""
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}-", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(scratch, 0o777 & ~_UMASK)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities by None so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return json_safe(value.tolist())
    return value


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    return write_text(path, json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike[str], error: type[Exception], *, invalid: str = "invalid JSON",
              hint: str = "") -> Any:
    """Parse a JSON file; undecodable or malformed content raises ``error`` as one line:
    ``PATH: <invalid> (<parser's reason>)<hint>``."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = " ".join(str(exc).split())[:200]
        raise error(f"{path}: {invalid} ({reason}){hint}") from None


@contextmanager
def temp_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp file name beside ``target`` for writers that need a path (e.g. a GGUF writer);
    renamed onto ``target`` when the block succeeds, removed otherwise."""
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)


def csv_text(rows: Iterable[dict[str, Any]]) -> str:
    """Rows as CSV; the columns are the union of the rows' keys, in first-seen order."""
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    return write_text(path, csv_text(rows))


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Any]) -> Path:
    """One JSON object per line (UTF-8, not ASCII-escaped)."""
    return write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def write_png(figure: Any, path: str | os.PathLike[str], **savefig: Any) -> Path:
    """Save a matplotlib figure atomically as PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **savefig)
    return write_bytes(path, buffer.getvalue())
