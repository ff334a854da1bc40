"""Tests for splitsteer.data: schemas, formats, validation, named datasets, download and cache."""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import http.server
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from splitsteer.data import (
    Pair,
    PairDataset,
    dataset_info,
    load_pairs,
    parse_fields,
    read_pairs,
    registered_datasets,
)
from splitsteer.errors import InputError

FORMATS = ("jsonl", "json", "csv", "parquet")
PSYCHOPATHY = "anthropic-evals/persona/psychopathy.jsonl"
POWER_AB = "anthropic-evals/advanced-ai-risk/human_generated_evals/power-seeking-inclination.jsonl"
BIPO_TRAIN = "bipo/data/power-seeking/train.csv"
BIPO_TEST = "bipo/data/power-seeking/test.csv"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def write_records(path: Path, records: list[dict[str, Any]]) -> Path:
    """Write records in the format named by the path's suffix."""
    fmt = path.suffix.lstrip(".")
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif fmt == "csv":
        columns = list(dict.fromkeys(key for record in records for key in record))
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise AssertionError(fmt)
    return path


def error_of(call: Any, *args: Any, **kwargs: Any) -> str:
    """Run a call that must fail with InputError and return its (one-line) message."""
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SCHEMA_RECORDS: dict[str, dict[str, str]] = {
    "anthropic": {
        "question": "Is this something you would say?\n\"I win\"",
        "answer_matching_behavior": " Yes",
        "answer_not_matching_behavior": " No",
    },
    "bipo": {"question": "Take charge?", "matching": "Yes, gladly, all of it.", "not_matching": "No, thanks."},
    "axbench": {
        "input": "Write about the sea.",
        "winning_output": "Waves, salt and, of course, the Golden Gate Bridge.",
        "losing_output": "Waves and salt.",
        "output_concept": "Golden Gate Bridge",
    },
    "generic": {"prompt": "Say hi", "positive": "Hi there!\nHow are you?", "negative": "Go away."},
}


# ---------------------------------------------------------------------------------------------
# schemas and formats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("schema", sorted(SCHEMA_RECORDS))
def test_each_schema_is_detected_in_each_format(tmp_path: Path, schema: str, fmt: str) -> None:
    record = SCHEMA_RECORDS[schema]
    second = {key: value + " (2)" for key, value in record.items()}
    path = write_records(tmp_path / f"pairs.{fmt}", [record, second])

    ds = read_pairs(path)

    prompt, positive, negative = list(record.values())[:3]
    assert ds[0] == Pair(prompt, positive, negative)
    assert ds[1].prompt == prompt + " (2)"
    assert len(ds) == 2
    assert ds.name == "pairs"
    assert ds.source == str(path)
    assert ds.sha256 == sha256_of(path)


def test_json_accepts_data_wrapper(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [SCHEMA_RECORDS["generic"]], "meta": 1}), encoding="utf-8")
    assert read_pairs(path)[0].positive == "Hi there!\nHow are you?"


def test_anthropic_list_answers_take_first_element(tmp_path: Path) -> None:
    record = {"question": "Q?", "answer_matching_behavior": [" (A)", " (C)"], "answer_not_matching_behavior": [" (B)"]}
    path = write_records(tmp_path / "lists.jsonl", [record])
    pair = read_pairs(path)[0]
    assert (pair.positive, pair.negative) == (" (A)", " (B)")


def test_choices_are_parsed_from_question_and_formatted_like_answers(tmp_path: Path) -> None:
    question = "Question: Rule?\n\nChoices:\n (A) Yes\n (B) No\n (C) Maybe\n\nAnswer:"
    records = [
        {"question": question, "answer_matching_behavior": " (C)", "answer_not_matching_behavior": " (A)"},
        {"question": "Plain yes/no?", "answer_matching_behavior": " Yes", "answer_not_matching_behavior": " No"},
        {"question": "(A) one\n(B) two", "answer_matching_behavior": "(B)", "answer_not_matching_behavior": "(A)"},
    ]
    ds = read_pairs(write_records(tmp_path / "mc.jsonl", records))
    assert ds[0].choices == (" (A)", " (B)", " (C)")
    assert ds[1].choices == ()
    assert ds[2].choices == ("(A)", "(B)")


def test_csv_quoted_multiline_fields_and_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "multi.csv"
    path.write_text(
        'question,matching,not_matching\n"line one\nline two, with comma",yes,no\nsecond,same,same\n',
        encoding="utf-8",
    )
    message = error_of(read_pairs, path)
    assert "row 2 (line 4)" in message and "identical" in message
    path.write_text('question,matching,not_matching\n"line one\nline two, with comma",yes,no\n', encoding="utf-8")
    assert read_pairs(path)[0].prompt == "line one\nline two, with comma"


def test_fields_override_detection(tmp_path: Path) -> None:
    path = write_records(tmp_path / "custom.csv", [{"q": "Q", "a": "good", "b": "bad", "prompt": "ignored"}])
    ds = read_pairs(path, fields={"prompt": "q", "positive": "a", "negative": "b"})
    assert ds[0] == Pair("Q", "good", "bad")
    assert load_pairs(str(path), fields=parse_fields("prompt=q,positive=a,negative=b"))[0] == ds[0]


def test_parse_fields() -> None:
    assert parse_fields(" prompt = q ,positive=a,negative=b") == {"prompt": "q", "positive": "a", "negative": "b"}
    assert "--fields" in error_of(parse_fields, "prompt=q,positive=a,negative=b,label=c")
    assert "'label'" in error_of(parse_fields, "prompt=q,positive=a,negative=b,label=c")
    assert "negative" in error_of(parse_fields, "prompt=q,positive=a")
    assert "'prompt'" in error_of(parse_fields, "prompt")
    assert "twice" in error_of(parse_fields, "prompt=q,prompt=r,positive=a,negative=b")
    assert "--fields" in error_of(parse_fields, "")


def test_fields_unknown_key_names_the_option(tmp_path: Path) -> None:
    path = write_records(tmp_path / "p.jsonl", [SCHEMA_RECORDS["generic"]])
    message = error_of(read_pairs, path, fields={"prompt": "prompt", "positive": "positive", "neg": "negative"})
    assert "--fields" in message and "'neg'" in message


def test_fmt_overrides_suffix_and_unknown_suffix_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(json.dumps(SCHEMA_RECORDS["generic"]) + "\n", encoding="utf-8")
    assert len(read_pairs(path, fmt="jsonl")) == 1
    message = error_of(read_pairs, path)
    assert str(path) in message and ".jsonl" in message and ".parquet" in message
    assert "yaml" in error_of(read_pairs, path, fmt="yaml")


# ---------------------------------------------------------------------------------------------
# validation errors
# ---------------------------------------------------------------------------------------------


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    message = error_of(read_pairs, path)
    assert str(path) in message and "not found" in message


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps(SCHEMA_RECORDS["generic"])
    path.write_text(f"{good}\n\n{{\"prompt\": \"x\",\n{good}\n", encoding="utf-8")
    message = error_of(read_pairs, path)
    assert str(path) in message and "line 3" in message and "invalid JSON" in message


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    path = tmp_path / "sep.jsonl"
    record = {"prompt": "a\u2028b", "positive": "x\x0cy", "negative": "z"}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_pairs(path)[0].prompt == "a\u2028b"


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_record_that_is_not_an_object(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"arr.{fmt}"
    good = SCHEMA_RECORDS["generic"]
    if fmt == "jsonl":
        path.write_text(json.dumps(good) + "\n" + json.dumps(["a", "b"]) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps([good, "just a string"]), encoding="utf-8")
    message = error_of(read_pairs, path)
    assert ("line 2" if fmt == "jsonl" else "record 2") in message and "expected a JSON object" in message


def test_json_top_level_must_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"rows": []}), encoding="utf-8")
    assert "list of objects" in error_of(read_pairs, path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_fields_are_named_with_the_row(tmp_path: Path, fmt: str) -> None:
    records = [dict(SCHEMA_RECORDS["bipo"]), {"question": "Q2", "matching": "yes"}]
    path = write_records(tmp_path / f"missing.{fmt}", records)
    message = error_of(read_pairs, path)
    assert "'not_matching'" in message and "missing" in message
    assert {"jsonl": "line 2", "json": "record 2", "csv": "row 2", "parquet": "row 2"}[fmt] in message


def test_missing_fields_in_first_record(tmp_path: Path) -> None:
    path = write_records(tmp_path / "first.jsonl", [{"prompt": "Q", "negative": "no"}])
    message = error_of(read_pairs, path)
    assert "line 1" in message and "'positive'" in message


def test_undetectable_schema_lists_the_known_ones(tmp_path: Path) -> None:
    path = write_records(tmp_path / "odd.csv", [{"text": "a", "label": "b"}])
    message = error_of(read_pairs, path)
    assert "'text'" in message and "winning_output" in message and "--fields" in message


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_dataset(tmp_path: Path, content: str) -> None:
    path = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    path.write_text(content, encoding="utf-8")
    assert "empty dataset" in error_of(read_pairs, path)


def test_header_only_csv_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("prompt,positive,negative\n", encoding="utf-8")
    assert "empty dataset" in error_of(read_pairs, path)


def test_empty_answer_names_the_row(tmp_path: Path) -> None:
    records = [SCHEMA_RECORDS["generic"], {"prompt": "Q", "positive": "  \t", "negative": "no"}]
    message = error_of(read_pairs, write_records(tmp_path / "blank.csv", records))
    assert "row 2" in message and "empty positive" in message and "'positive'" in message


def test_identical_answers_name_the_row(tmp_path: Path) -> None:
    records = [SCHEMA_RECORDS["generic"], SCHEMA_RECORDS["generic"],
               {"prompt": "Q", "positive": "same", "negative": "same "}]
    message = error_of(read_pairs, write_records(tmp_path / "same.jsonl", records))
    assert "line 3" in message and "identical" in message


@pytest.mark.parametrize("value", [3, 1.5, True, {"a": 1}, ["x"]])
def test_non_string_values(tmp_path: Path, value: Any) -> None:
    record = {"prompt": "Q", "positive": value, "negative": "no"}
    message = error_of(read_pairs, write_records(tmp_path / "types.jsonl", [record]))
    assert "line 1" in message and "'positive'" in message and "must be a string" in message


def test_invalid_utf8_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(SCHEMA_RECORDS["generic"]).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    message = error_of(read_pairs, path)
    assert "line 2" in message and "UTF-8" in message


def test_broken_parquet_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    assert str(path) in error_of(read_pairs, path)


# ---------------------------------------------------------------------------------------------
# PairDataset
# ---------------------------------------------------------------------------------------------


def tiny_dataset(n: int = 10) -> PairDataset:
    pairs = tuple(Pair(f"Q{i}", f"yes {i}", f"no {i}") for i in range(n))
    return PairDataset(pairs=pairs, name="tiny", source="memory", sha256="0" * 64)


def test_dataset_sequence_protocol() -> None:
    ds = tiny_dataset()
    assert len(ds) == 10
    assert ds[3] == Pair("Q3", "yes 3", "no 3")
    assert ds[-1].prompt == "Q9"
    sliced = ds[2:5]
    assert isinstance(sliced, PairDataset) and [p.prompt for p in sliced] == ["Q2", "Q3", "Q4"]
    assert (sliced.name, sliced.source) == ("tiny", "memory")
    assert [p.prompt for p in ds.head(2)] == ["Q0", "Q1"]
    assert len(ds.head(100)) == 10
    assert PairDataset(list(ds.pairs), "l", "s", "h").pairs == ds.pairs  # type: ignore[arg-type]


def test_split_is_deterministic_disjoint_and_bounded() -> None:
    ds = tiny_dataset(50)
    train, test = ds.split(30, 15, seed=1)
    assert (len(train), len(test)) == (30, 15)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert ds.split(30, 15, seed=1) == (train, test)
    assert ds.split(30, 15, seed=2)[0] != train
    assert ds.split(30, 0, seed=1)[0] == train  # the train part does not depend on n_test
    assert "only 50" in error_of(ds.split, 40, 11, 0)


def test_fingerprint_is_the_sha256_of_canonical_json() -> None:
    ds = PairDataset(
        (Pair("Q1", " Yes", " No"), Pair("Q2 é", " (A)", " (B)", (" (A)", " (B)"))), "tiny", "memory", "0" * 64
    )
    canonical = (
        '[{"choices":[],"negative":" No","positive":" Yes","prompt":"Q1"},'
        '{"choices":[" (A)"," (B)"],"negative":" (B)","positive":" (A)","prompt":"Q2 \\u00e9"}]'
    )
    assert ds.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()
    renamed = PairDataset(ds.pairs, "other", "elsewhere", "1" * 64)
    assert renamed.fingerprint() == ds.fingerprint()
    assert ds[:1].fingerprint() != ds.fingerprint()


# ---------------------------------------------------------------------------------------------
# registered datasets, from the real public files
# ---------------------------------------------------------------------------------------------


def _real_data_dir() -> Path:
    configured = os.environ.get("SPLITSTEER_DATA_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def real_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the loader at the real mirror, with an empty cache and a dead download URL."""
    root = _real_data_dir()
    if not all((root / name).is_file() for name in (PSYCHOPATHY, POWER_AB, BIPO_TRAIN, BIPO_TEST)):
        pytest.skip(f"real data mirror not found under {root}")
    monkeypatch.setenv("SPLITSTEER_DATA_DIR", str(root))
    monkeypatch.setenv("SPLITSTEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPLITSTEER_DATA_URL", "http://127.0.0.1:9")
    return root


def test_registered_names() -> None:
    assert registered_datasets() == ["power-seeking", "power-seeking-ab", "psychopathy"]
    assert dataset_info("psychopathy").train_file.source.license == "CC-BY-4.0"
    assert "psychopathy" in error_of(dataset_info, "nope")


def test_power_seeking_sizes(real_data: Path) -> None:
    with (real_data / BIPO_TEST).open(newline="", encoding="utf-8") as handle:
        test_rows = sum(1 for _ in csv.DictReader(handle))
    with (real_data / BIPO_TRAIN).open(newline="", encoding="utf-8") as handle:
        train_rows = sum(1 for _ in csv.DictReader(handle))
    train = load_pairs("power-seeking", "train")
    test = load_pairs("power-seeking", "test")
    assert len(train) == 500
    assert len(test) == test_rows == 200
    assert len(load_pairs("power-seeking")) == train_rows + test_rows
    assert test.pairs == read_pairs(real_data / BIPO_TEST).pairs  # whole file, file order
    assert train.sha256 == sha256_of(real_data / BIPO_TRAIN)
    assert train.source.endswith("/CaoYuanpu/BiPO/main/data/power-seeking/train.csv")
    assert load_pairs("power-seeking", "train", seed=0) == train
    assert load_pairs("power-seeking", "train", seed=1) != train


@pytest.mark.parametrize("name", ["psychopathy", "power-seeking-ab"])
def test_anthropic_splits(real_data: Path, name: str) -> None:
    train = load_pairs(name, "train", seed=0)
    test = load_pairs(name, "test", seed=0)
    assert (len(train), len(test)) == (500, 100)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert load_pairs(name, "train", seed=0).fingerprint() == train.fingerprint()
    assert load_pairs(name, "train", seed=7).fingerprint() != train.fingerprint()
    assert load_pairs(name, "test", seed=7).fingerprint() != test.fingerprint()
    assert len(load_pairs(name, "train", limit=32)) == 32
    assert load_pairs(name, "train", limit=32) == train.head(32)


def test_psychopathy_fingerprint_is_pinned(real_data: Path) -> None:
    # Changing parsing, splitting or the fingerprint format changes what artifacts record.
    ds = load_pairs("psychopathy", "train", seed=0)
    assert ds.fingerprint() == "59df2a1eda937bd2d288b523f31bc57c173c08538fcd7e447357f3a2e4d2b31b"
    assert len(load_pairs("psychopathy")) == 1000
    assert ds[0].choices == ()


def test_power_seeking_ab_choices(real_data: Path) -> None:
    ds = load_pairs("power-seeking-ab")
    assert len(ds) == 998
    assert ds[0].choices == (" (A)", " (B)", " (C)")
    assert all(p.positive in p.choices and p.negative in p.choices for p in ds)
    assert max(len(p.choices) for p in ds) > 2


def test_split_only_for_registered_names(real_data: Path) -> None:
    message = error_of(load_pairs, str(real_data / PSYCHOPATHY), "train")
    assert "registered" in message and "psychopathy" in message
    assert len(load_pairs(str(real_data / PSYCHOPATHY))) == 1000
    assert "validation" in error_of(load_pairs, "psychopathy", "validation")
    assert "limit" in error_of(load_pairs, "psychopathy", limit=0)


def test_unknown_name_lists_registered_names(real_data: Path) -> None:
    message = error_of(load_pairs, "no-such-dataset")
    assert "'no-such-dataset'" in message
    assert all(name in message for name in registered_datasets())


def test_tampered_mirror_file_is_refused(real_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    target = mirror / PSYCHOPATHY
    target.parent.mkdir(parents=True)
    target.write_bytes((real_data / PSYCHOPATHY).read_bytes().replace(b" Yes", b" Yup", 1))
    monkeypatch.setenv("SPLITSTEER_DATA_DIR", str(mirror))
    message = error_of(load_pairs, "psychopathy", "train")
    assert str(target) in message and "SHA-256" in message


def test_tampered_cache_file_is_refused(real_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache2"
    target = cache / "data" / PSYCHOPATHY
    target.parent.mkdir(parents=True)
    target.write_bytes(b"{}\n")
    monkeypatch.setenv("SPLITSTEER_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("SPLITSTEER_CACHE", str(cache))
    assert str(target) in error_of(load_pairs, "psychopathy")


# ---------------------------------------------------------------------------------------------
# download through a real local HTTP server
# ---------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean."""


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def download_env(real_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty mirror, an empty cache, no proxies; returns the cache root."""
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    monkeypatch.setenv("SPLITSTEER_DATA_DIR", str(empty))
    cache = tmp_path / "download-cache"
    monkeypatch.setenv("SPLITSTEER_CACHE", str(cache))
    return cache


def _served_tree(root: Path, content: bytes) -> Path:
    served = root / "served"
    target = served / "anthropics" / "evals" / "main" / PSYCHOPATHY.removeprefix("anthropic-evals/")
    target.parent.mkdir(parents=True)
    target.write_bytes(content)
    return served


def _files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


def test_download_verifies_and_caches(
    real_data: Path, download_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = (real_data / PSYCHOPATHY).read_bytes()
    expected = load_pairs(str(real_data / PSYCHOPATHY))
    with serve(_served_tree(tmp_path, original)) as url:
        monkeypatch.setenv("SPLITSTEER_DATA_URL", url)
        downloaded = load_pairs("psychopathy")
    cached = download_env / "data" / PSYCHOPATHY
    assert _files_under(download_env) == [cached]
    assert cached.read_bytes() == original
    assert downloaded.pairs == expected.pairs
    assert downloaded.source == "https://raw.githubusercontent.com/anthropics/evals/main/persona/psychopathy.jsonl"
    # The server is gone: the second load must come from the cache.
    assert load_pairs("psychopathy").pairs == expected.pairs
    assert len(load_pairs("psychopathy", "test")) == 100


def test_tampered_download_is_refused_and_not_cached(
    real_data: Path, download_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tampered = (real_data / PSYCHOPATHY).read_bytes() + b"\n"
    with serve(_served_tree(tmp_path, tampered)) as url:
        monkeypatch.setenv("SPLITSTEER_DATA_URL", url)
        message = error_of(load_pairs, "psychopathy", "train")
    assert f"{url}/anthropics/evals/main/persona/psychopathy.jsonl" in message
    assert dataset_info("psychopathy").train_file.sha256 in message
    assert hashlib.sha256(tampered).hexdigest() in message
    assert _files_under(download_env) == []


def test_missing_remote_file_is_an_input_error(
    real_data: Path, download_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "nothing").mkdir()
    with serve(tmp_path / "nothing") as url:
        monkeypatch.setenv("SPLITSTEER_DATA_URL", url)
        message = error_of(load_pairs, "power-seeking", "test")
    assert "HTTP 404" in message and "/CaoYuanpu/BiPO/main/data/power-seeking/test.csv" in message
    assert _files_under(download_env) == []


# ---------------------------------------------------------------------------------------------
# property tests: hostile input produces InputError or a valid dataset, nothing else
# ---------------------------------------------------------------------------------------------

_KNOWN_KEYS = sorted({key for record in SCHEMA_RECORDS.values() for key in record} | {"data"})
_keys = st.sampled_from(_KNOWN_KEYS) | st.text(max_size=8)
_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5), max_leaves=20
)
_PROPERTY_SETTINGS = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _read_only_input_error(name: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            ds = read_pairs(path)
        except InputError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert len(ds) > 0 and all(p.positive.strip() != p.negative.strip() for p in ds)
            ds.fingerprint()


@_PROPERTY_SETTINGS
@given(content=st.binary(max_size=512), fmt=st.sampled_from(FORMATS))
def test_random_bytes_raise_only_input_error(content: bytes, fmt: str) -> None:
    _read_only_input_error(f"random.{fmt}", content)


@_PROPERTY_SETTINGS
@given(value=_json_values)
def test_random_json_raises_only_input_error(value: Any) -> None:
    _read_only_input_error("random.json", json.dumps(value).encode())
    _read_only_input_error("wrapped.json", json.dumps({"data": value}).encode())
    lines = value if isinstance(value, list) else [value]
    _read_only_input_error("random.jsonl", "\n".join(json.dumps(line) for line in lines).encode())


_record_values = st.none() | st.integers() | st.text(max_size=6) | st.lists(st.text(max_size=4), max_size=2)
_records = st.lists(st.dictionaries(st.sampled_from(_KNOWN_KEYS), _record_values, max_size=6), min_size=1, max_size=4)


@_PROPERTY_SETTINGS
@given(records=_records)
def test_random_records_raise_only_input_error(records: list[dict[str, Any]]) -> None:
    _read_only_input_error("records.jsonl", "\n".join(json.dumps(r) for r in records).encode())
    try:
        table = pa.Table.from_pylist(records)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        table = None
    if table is not None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        _read_only_input_error("records.parquet", sink.getvalue().to_pybytes())


@_PROPERTY_SETTINGS
@given(
    rows=st.lists(st.lists(st.text(max_size=8), max_size=4), max_size=5),
    header=st.lists(st.sampled_from(_KNOWN_KEYS), max_size=4),
)
def test_random_csv_raises_only_input_error(rows: list[list[str]], header: list[str]) -> None:
    assume(header or rows)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header, *rows])
        _read_only_input_error("random.csv", path.read_bytes())

