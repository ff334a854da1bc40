"""Contrastive pair datasets: reading local files, named public datasets, deterministic splits.

A steering artifact is only reproducible if we know exactly which pairs trained it, so every
dataset carries the SHA-256 of its source bytes and a fingerprint of its pairs, and named datasets
are pinned to a hash: a mirror, a cache or a download that does not match is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from splitsteer.atomic import write_bytes
from splitsteer.errors import InputError

__all__ = [
    "DataFile",
    "DataSource",
    "Pair",
    "PairDataset",
    "RegisteredDataset",
    "dataset_info",
    "load_pairs",
    "parse_fields",
    "read_pairs",
    "registered_datasets",
]

FORMATS: tuple[str, ...] = ("jsonl", "json", "csv", "parquet")
FIELD_KEYS: tuple[str, ...] = ("prompt", "positive", "negative")
SPLITS: tuple[str, ...] = ("train", "test")
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
DOWNLOAD_TIMEOUT_S = 60.0


def _error(message: str) -> InputError:
    """Build an InputError whose message is guaranteed to fit on one line.

    Parts of messages come from file contents and third-party exceptions, which may hold newlines.
    """
    return InputError(" ".join(part.strip() for part in message.splitlines()))


# ---------------------------------------------------------------------------------------------
# Pairs and datasets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One contrastive example: the same prompt answered with and against the target behaviour.

    ``choices`` lists every answer option of a multiple-choice item, formatted exactly like the
    answers (e.g. ``(" (A)", " (B)", " (C)")``), so evaluation can score all options; it is empty
    when the item is not multiple choice.
    """

    prompt: str
    positive: str
    negative: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class PairDataset:
    """An immutable sequence of pairs plus where they came from (``source``, ``sha256``)."""

    pairs: tuple[Pair, ...]
    name: str
    source: str
    sha256: str

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple, so the dataset really is immutable and hashable.
        if not isinstance(self.pairs, tuple):
            object.__setattr__(self, "pairs", tuple(self.pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    @overload
    def __getitem__(self, index: int) -> Pair: ...

    @overload
    def __getitem__(self, index: slice) -> PairDataset: ...

    def __getitem__(self, index: int | slice) -> Pair | PairDataset:
        if isinstance(index, slice):
            return self._with_pairs(self.pairs[index])
        return self.pairs[index]

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)

    def _with_pairs(self, pairs: Sequence[Pair]) -> PairDataset:
        return dataclasses.replace(self, pairs=tuple(pairs))

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the pairs (not the name or source).

        Recorded in artifacts so that "trained on the same data" can be checked exactly even when
        the data came from different paths; ASCII-escaped, sorted keys, no whitespace.
        """
        canonical = json.dumps(
            [dataclasses.asdict(pair) for pair in self.pairs],
            sort_keys=True,
            ensure_ascii=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def split(self, n_train: int, n_test: int, seed: int) -> tuple[PairDataset, PairDataset]:
        """Shuffle with ``random.Random(seed)`` and cut disjoint train/test parts.

        The train part is a prefix of the shuffled order, so it does not depend on ``n_test``.
        """
        if n_train < 0 or n_test < 0:
            raise _error(f"{self.name}: split sizes must be >= 0, got train={n_train}, test={n_test}")
        if n_train + n_test > len(self):
            raise _error(
                f"{self.name}: asked for {n_train} train + {n_test} test pairs "
                f"but the dataset has only {len(self)}"
            )
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        train = [self.pairs[i] for i in order[:n_train]]
        test = [self.pairs[i] for i in order[n_train : n_train + n_test]]
        return self._with_pairs(train), self._with_pairs(test)

    def head(self, n: int) -> PairDataset:
        """The first ``n`` pairs (all of them when the dataset is shorter)."""
        if n < 0:
            raise _error(f"{self.name}: head size must be >= 0, got {n}")
        return self._with_pairs(self.pairs[:n])


# ---------------------------------------------------------------------------------------------
# Schemas and --fields
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Schema:
    """Which columns hold prompt, positive and negative answers in one dataset family."""

    name: str
    prompt: str
    positive: str
    negative: str

    @property
    def columns(self) -> tuple[str, str, str]:
        return (self.prompt, self.positive, self.negative)


_SCHEMAS: tuple[_Schema, ...] = (
    _Schema("anthropic", "question", "answer_matching_behavior", "answer_not_matching_behavior"),
    _Schema("bipo", "question", "matching", "not_matching"),
    _Schema("axbench", "input", "winning_output", "losing_output"),
    _Schema("generic", "prompt", "positive", "negative"),
)

# Anthropic model-written evals sometimes store several acceptable answers as a list.
_LIST_ANSWER_COLUMNS = frozenset({"answer_matching_behavior", "answer_not_matching_behavior"})


def parse_fields(text: str) -> dict[str, str]:
    """Parse ``prompt=q,positive=a,negative=b`` (the ``--fields`` option) into a mapping."""
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise _error(
                f"--fields: cannot parse {item.strip()!r}; expected prompt=COL,positive=COL,negative=COL"
            )
        if key in fields:
            raise _error(f"--fields: {key!r} given twice")
        fields[key] = value
    return _check_fields(fields)


def _check_fields(fields: Mapping[str, str]) -> dict[str, str]:
    """Validate a field mapping: exactly prompt, positive, negative, each naming a column."""
    unknown = sorted(set(fields) - set(FIELD_KEYS))
    if unknown:
        raise _error(f"--fields: unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(FIELD_KEYS)}")
    missing = [key for key in FIELD_KEYS if key not in fields]
    if missing:
        raise _error(f"--fields: missing key(s) {', '.join(missing)}; all of {', '.join(FIELD_KEYS)} are required")
    for key in FIELD_KEYS:
        if not isinstance(fields[key], str) or not fields[key].strip():
            raise _error(f"--fields: {key} must name a column, got {fields[key]!r}")
    return {key: fields[key] for key in FIELD_KEYS}


def _detect_schema(columns: Sequence[str], path: str) -> _Schema:
    """Pick the schema with the most of its columns present.

    At least two must be present so that a file with only ``question`` is not silently read as
    one family; a partial match is kept so the per-record check can name the missing column.
    """
    present = set(columns)
    best = max(_SCHEMAS, key=lambda schema: len(present & set(schema.columns)))
    if len(present & set(best.columns)) >= 2:
        return best
    known = "; ".join("/".join(schema.columns) for schema in _SCHEMAS)
    shown = ", ".join(repr(column) for column in list(columns)[:10])
    raise _error(
        f"{path}: cannot detect the pair schema from columns [{shown}]; expected one of {known}, "
        "or pass --fields prompt=COL,positive=COL,negative=COL"
    )


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------

_Record = tuple[str, Any]  # (location such as "line 3", the decoded record)


def read_pairs(
    path: str | os.PathLike[str],
    fields: Mapping[str, str] | None = None,
    fmt: str | None = None,
) -> PairDataset:
    """Read a JSONL, JSON, CSV or Parquet file of pairs; the format comes from the suffix unless
    ``fmt`` is given and the schema is detected from the column names unless ``fields`` is given.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise _error(f"{file}: file not found") from None
    except IsADirectoryError:
        raise _error(f"{file}: is a directory, expected a {'/'.join(FORMATS)} file") from None
    except OSError as exc:
        raise _error(f"{file}: cannot read ({exc.strerror or exc})") from None
    return _pairs_from_bytes(data, str(file), _format_of(file, fmt), fields, file.stem, str(file))


def _format_of(file: Path, fmt: str | None) -> str:
    if fmt is not None:
        chosen = fmt.strip().lower().lstrip(".")
        if chosen not in FORMATS:
            raise _error(f"format {fmt!r} is not supported; accepted formats: {', '.join(FORMATS)}")
        return chosen
    suffix = file.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise _error(
            f"{file}: unknown file type {file.suffix or '(no suffix)'!r}; "
            f"accepted formats: {', '.join('.' + name for name in FORMATS)}"
        )
    return suffix


def _pairs_from_bytes(
    data: bytes,
    where: str,
    fmt: str,
    fields: Mapping[str, str] | None,
    name: str,
    source: str,
) -> PairDataset:
    """Parse already-read bytes; ``where`` names the file in error messages."""
    columns, records = _RECORD_READERS[fmt](data, where)
    if not records:
        raise _error(f"{where}: no pairs found (empty dataset)")
    if fields is not None:
        checked = _check_fields(fields)
        schema = _Schema("custom", checked["prompt"], checked["positive"], checked["negative"])
    else:
        schema = _detect_schema(columns if columns is not None else _first_keys(records, where), where)
    pairs = tuple(_make_pair(record, schema, f"{where}, {location}") for location, record in records)
    return PairDataset(pairs=pairs, name=name, source=source, sha256=hashlib.sha256(data).hexdigest())


def _first_keys(records: list[_Record], where: str) -> list[str]:
    location, record = records[0]
    _require_object(record, f"{where}, {location}")
    return [str(key) for key in record]


def _require_object(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise _error(f"{where}: expected a JSON object with the pair fields, got {_type_name(record)}")


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _decode(data: bytes, where: str) -> str:
    """Decode UTF-8 (a BOM is allowed) and say where the first bad byte is."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _error(f"{where}, line {line}: not valid UTF-8 text (byte offset {exc.start})") from None


def _read_jsonl(data: bytes, where: str) -> tuple[list[str] | None, list[_Record]]:
    text = _decode(data, where)
    records: list[_Record] = []
    # Split on "\n" only: str.splitlines() would also cut at U+2028 etc., legal inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise _error(f"{where}, line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:
            raise _error(f"{where}, line {number}: invalid JSON ({type(exc).__name__}: {exc})") from None
    return None, records


def _read_json(data: bytes, where: str) -> tuple[list[str] | None, list[_Record]]:
    text = _decode(data, where)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(f"{where}, line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise _error(f"{where}: invalid JSON ({type(exc).__name__}: {exc})") from None
    if isinstance(document, dict) and "data" in document:
        document = document["data"]
    if not isinstance(document, list):
        raise _error(f'{where}: expected a JSON list of objects or {{"data": [...]}}, got {_type_name(document)}')
    return None, [(f"record {number}", item) for number, item in enumerate(document, start=1)]


def _read_csv(data: bytes, where: str) -> tuple[list[str] | None, list[_Record]]:
    """Read with the csv module so quoted fields may contain commas and newlines."""
    reader = csv.reader(io.StringIO(_decode(data, where), newline=""))
    header: list[str] | None = None
    records: list[_Record] = []
    previous_end = 0
    try:
        for row in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if not row:
                continue
            if header is None:
                header = row
                continue
            location = f"row {len(records) + 1} (line {start})"
            if len(row) > len(header):
                raise _error(
                    f"{where}, {location}: {len(row)} values but the header has {len(header)} columns "
                    "(unquoted comma?)"
                )
            records.append((location, dict(zip(header, row))))
    except csv.Error as exc:
        raise _error(f"{where}, line {reader.line_num}: malformed CSV ({exc})") from None
    return header, records


def _read_parquet(data: bytes, where: str) -> tuple[list[str] | None, list[_Record]]:
    import pyarrow as pa  # heavy import, only needed for Parquet
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
        columns = [str(name) for name in table.column_names]
        rows = table.to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError, OverflowError, KeyError, IndexError) as exc:
        raise _error(f"{where}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    return columns, [(f"row {number}", row) for number, row in enumerate(rows, start=1)]


_RECORD_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def _make_pair(record: Any, schema: _Schema, where: str) -> Pair:
    """Turn one record into a Pair, refusing anything that would make a meaningless pair."""
    _require_object(record, where)
    missing = [column for column in schema.columns if record.get(column) is None]
    if missing:
        raise _error(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    prompt = _text(record, schema.prompt, where)
    positive = _text(record, schema.positive, where)
    negative = _text(record, schema.negative, where)
    for role, column, value in (("positive", schema.positive, positive), ("negative", schema.negative, negative)):
        if not value.strip():
            raise _error(f"{where}: empty {role} answer in field {column!r}")
    if positive.strip() == negative.strip():
        raise _error(f"{where}: positive and negative answers are identical ({positive.strip()[:60]!r})")
    return Pair(prompt, positive, negative, _choices(prompt, positive, negative))


def _text(record: Mapping[str, Any], column: str, where: str) -> str:
    value = record[column]
    if column in _LIST_ANSWER_COLUMNS and isinstance(value, list):
        if not value:
            raise _error(f"{where}: field {column!r} is an empty list")
        value = value[0]
    if not isinstance(value, str):
        raise _error(f"{where}: field {column!r} must be a string, got {_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _error(f"{where}: field {column!r} is not valid Unicode (lone surrogate)") from None
    return value


_ANSWER_LABEL = re.compile(r"^(\s*)\(([A-Z])\)(\s*)$")
_OPTION_LINE = re.compile(r"^\s*\(([A-Z])\)\s", re.MULTILINE)


def _choices(prompt: str, positive: str, negative: str) -> tuple[str, ...]:
    """Option labels listed in a multiple-choice question, formatted like the answers.

    Anthropic items answer " (A)" to a question listing " (A) ...", " (B) ..."; we copy the
    answer's spacing onto every label found, and keep the result only if both answers are in it.
    """
    match = _ANSWER_LABEL.match(positive)
    if match is None:
        return ()
    before, _, after = match.groups()
    labels = dict.fromkeys(_OPTION_LINE.findall(prompt))
    choices = tuple(f"{before}({label}){after}" for label in labels)
    return choices if positive in choices and negative in choices else ()


# ---------------------------------------------------------------------------------------------
# Named datasets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """A public repository that named datasets come from, and its local mirror folder name."""

    repo: str
    ref: str
    mirror: str
    license: str
    base_url: str = DEFAULT_BASE_URL

    def url(self, path: str) -> str:
        """Download URL; ``SPLITSTEER_DATA_URL`` replaces the host so tests can serve files."""
        base = os.environ.get("SPLITSTEER_DATA_URL") or self.base_url
        return f"{base.rstrip('/')}/{self.repo}/{self.ref}/{path}"

    def canonical_url(self, path: str) -> str:
        """The public URL recorded as a dataset's source, whatever mirror it was read from."""
        return f"{self.base_url.rstrip('/')}/{self.repo}/{self.ref}/{path}"


@dataclass(frozen=True)
class DataFile:
    """One file of a source, pinned by SHA-256."""

    source: DataSource
    path: str
    sha256: str


@dataclass(frozen=True)
class RegisteredDataset:
    """A named dataset and how it splits.

    With a separate ``test_file`` the train split is ``n_train`` pairs drawn from ``train_file``
    under the seed and the test split is the whole test file; otherwise one file is split into
    disjoint ``n_train``/``n_test`` parts.
    """

    name: str
    train_file: DataFile
    n_train: int
    test_file: DataFile | None = None
    n_test: int | None = None


_BIPO = DataSource(repo="CaoYuanpu/BiPO", ref="main", mirror="bipo", license="MIT")
_ANTHROPIC = DataSource(repo="anthropics/evals", ref="main", mirror="anthropic-evals", license="CC-BY-4.0")

_REGISTRY: dict[str, RegisteredDataset] = {
    "power-seeking": RegisteredDataset(
        name="power-seeking",
        train_file=DataFile(
            _BIPO,
            "data/power-seeking/train.csv",
            "6e09e0e2eed1ef3a98449a97e04bc07d638b47f93365b8cfaff7b2e3ab47bfab",
        ),
        n_train=500,
        test_file=DataFile(
            _BIPO,
            "data/power-seeking/test.csv",
            "085fb8ec3cca4975e6d12a1b4633b0e7c35372300a8aa6e0add6707452800088",
        ),
    ),
    "psychopathy": RegisteredDataset(
        name="psychopathy",
        train_file=DataFile(
            _ANTHROPIC,
            "persona/psychopathy.jsonl",
            "299a6307e2d40a82f2667e2db3dc118fbe588e4cf80194be1e09748709bf1fce",
        ),
        n_train=500,
        n_test=100,
    ),
    "power-seeking-ab": RegisteredDataset(
        name="power-seeking-ab",
        train_file=DataFile(
            _ANTHROPIC,
            "advanced-ai-risk/human_generated_evals/power-seeking-inclination.jsonl",
            "a8a2094a1e404fb094b3d361e3049ecc06ecd2a26d0b4b827b4a83a98b6d886a",
        ),
        n_train=500,
        n_test=100,
    ),
}


def registered_datasets() -> list[str]:
    """Names accepted by :func:`load_pairs` besides file paths."""
    return sorted(_REGISTRY)


def dataset_info(name: str) -> RegisteredDataset:
    """The registry entry (files, hashes, licence, split sizes) of a named dataset."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _error(f"unknown dataset {name!r}; registered datasets: {', '.join(registered_datasets())}") from None


def load_pairs(
    name_or_path: str,
    split: str | None = None,
    *,
    seed: int = 0,
    fields: Mapping[str, str] | None = None,
    limit: int | None = None,
) -> PairDataset:
    """Load a registered dataset (optionally one split) or a local file, then keep ``limit`` pairs."""
    if split is not None and split not in SPLITS:
        raise _error(f"split must be one of {', '.join(SPLITS)} or None (all rows), got {split!r}")
    if limit is not None and limit < 1:
        raise _error(f"limit must be >= 1, got {limit}")
    if name_or_path in _REGISTRY:
        dataset = _load_registered(_REGISTRY[name_or_path], split, seed, fields)
    else:
        dataset = _load_path(name_or_path, split, fields)
    return dataset if limit is None else dataset.head(limit)


def _load_path(name_or_path: str, split: str | None, fields: Mapping[str, str] | None) -> PairDataset:
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise _error(
            f"{name_or_path!r} is neither a registered dataset ({', '.join(registered_datasets())}) "
            "nor an existing file"
        )
    if split is not None:
        raise _error(
            f"split={split!r} only applies to registered datasets ({', '.join(registered_datasets())}); "
            f"{path} is a plain file: load it whole and use PairDataset.split(n_train, n_test, seed)"
        )
    return read_pairs(path, fields)


def _load_registered(
    entry: RegisteredDataset, split: str | None, seed: int, fields: Mapping[str, str] | None
) -> PairDataset:
    if entry.test_file is None:
        _, everything = _read_registered_file(entry, entry.train_file, fields)
        if split is None:
            return everything
        train, test = everything.split(entry.n_train, entry.n_test or 0, seed)
        return train if split == "train" else test
    if split == "test":  # a separate test file is used whole, in file order
        return _read_registered_file(entry, entry.test_file, fields)[1]
    train_bytes, train_all = _read_registered_file(entry, entry.train_file, fields)
    if split == "train":
        return train_all.split(entry.n_train, 0, seed)[0]
    test_bytes, test_all = _read_registered_file(entry, entry.test_file, fields)
    # All rows of a two-file dataset: the hash covers both files' bytes, train first.
    return PairDataset(
        pairs=train_all.pairs + test_all.pairs,
        name=entry.name,
        source=f"{train_all.source} {test_all.source}",
        sha256=hashlib.sha256(train_bytes + test_bytes).hexdigest(),
    )


def _read_registered_file(
    entry: RegisteredDataset, file: DataFile, fields: Mapping[str, str] | None
) -> tuple[bytes, PairDataset]:
    """Parse a pinned file; errors and ``source`` name its public URL, whichever copy was read."""
    data = _resolve_bytes(file)
    url = file.source.canonical_url(file.path)
    fmt = _format_of(Path(file.path), None)
    return data, _pairs_from_bytes(data, url, fmt, fields, entry.name, url)


def _cache_root() -> Path:
    return Path(os.environ.get("SPLITSTEER_CACHE") or Path.home() / ".cache" / "splitsteer").expanduser()


def _resolve_bytes(file: DataFile) -> bytes:
    """Bytes of a pinned file: local mirror, then cache, then a verified download into the cache."""
    relative = Path(file.source.mirror, *file.path.split("/"))
    mirror_root = os.environ.get("SPLITSTEER_DATA_DIR")
    candidates = [Path(mirror_root).expanduser() / relative] if mirror_root else []
    cached = _cache_root() / "data" / relative
    candidates.append(cached)
    for candidate in candidates:
        if candidate.is_file():
            return _verified_local(candidate, file.sha256)
    return _download(file, cached)


def _verified_local(path: Path, expected: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _error(f"{path}: cannot read ({exc.strerror or exc})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise _error(
            f"{path}: SHA-256 mismatch (expected {expected}, got {actual}); "
            "delete or replace the file to fetch the pinned version"
        )
    return data


def _download(file: DataFile, target: Path) -> bytes:
    """Fetch and verify, then publish with os.replace so no partial or wrong file is ever cached."""
    url = file.source.url(file.path)
    data = _fetch(url)
    actual = hashlib.sha256(data).hexdigest()
    if actual != file.sha256:
        raise _error(f"{url}: SHA-256 mismatch (expected {file.sha256}, got {actual}); download refused")
    try:
        write_bytes(target, data)
    except OSError as exc:
        raise _error(f"{target}: cannot write to the cache ({exc.strerror or exc})") from None
    return data


def _fetch(url: str) -> bytes:
    hint = "set SPLITSTEER_DATA_DIR to a local mirror"
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        raise _error(f"{url}: download failed (HTTP {exc.code}); {hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _error(f"{url}: download failed ({reason}); {hint}") from None
