"""Property and fuzz tests: the --factors parser, and every loader fed random bytes or JSON/YAML
must return a valid result or raise our clean error, never anything else.

(tests/test_data.py fuzzes the pair-file readers the same way.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from conftest import tiny_model
from splitsteer.cli import _read_sweep
from splitsteer.errors import ArtifactError, InputError
from splitsteer.run import ExperimentConfig, load_config
from splitsteer.sweep import MAX_FACTORS, parse_factors
from splitsteer.updates import FORMS, SteeringUpdate

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


# -- --factors ------------------------------------------------------------------------------------
def _expected(values: list[float]) -> list[float]:
    return sorted({round(v, 10) + 0.0 for v in [*values, 0.0]})


@FUZZ
@given(st.text(max_size=40) | st.from_regex(r"-?[0-9.e+-]{0,8}:-?[0-9.e+-]{0,8}:[0-9]{0,6}", fullmatch=True))
def test_any_factor_spec_parses_to_sorted_finite_factors_with_zero_or_fails_cleanly(spec: str) -> None:
    try:
        factors = parse_factors(spec)
    except InputError as exc:
        assert str(exc).startswith("--factors") and "\n" not in str(exc)
        return
    assert factors and 0.0 in factors and all(math.isfinite(f) for f in factors)
    assert factors == sorted(set(factors))


@FUZZ
@given(st.lists(finite, min_size=1, max_size=12))
def test_factor_lists_round_trip(values: list[float]) -> None:
    expected = _expected(values)
    assert parse_factors(",".join(repr(v) for v in values)) == expected
    assert parse_factors(values) == expected
    assert parse_factors(", ".join(repr(v) for v in reversed(values))) == expected  # order, spaces


@FUZZ
@given(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6), st.integers(1, 300))
def test_factor_ranges_round_trip(start: float, stop: float, count: int) -> None:
    values = [float(v) for v in np.linspace(start, stop, count)] if count > 1 else [start]
    assert parse_factors(f"{start!r}:{stop!r}:{count}") == _expected(values)
    assert parse_factors(f" {start!r} : {stop!r} : {count} ") == _expected(values)


def test_factor_range_size_is_bounded() -> None:
    assert len(parse_factors(f"-1:1:{MAX_FACTORS}")) == MAX_FACTORS + 1  # 0 is not on that grid
    with pytest.raises(InputError, match="at most"):
        parse_factors(f"0:1:{MAX_FACTORS + 1}")


# -- SteeringUpdate.load ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")  # 4 layers, hidden 32, MLP 48


@pytest.fixture(scope="module")
def artifact(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    """A valid LoRA artifact folder, plus its two files' bytes to start mutations from."""
    folder = tmp_path_factory.mktemp("fuzz") / "art"
    update = SteeringUpdate.zeros(model, "lora", 2, rank=2, init_std=0.1)
    update.save(folder)
    return folder, (folder / "steer.json").read_bytes(), (folder / "steer.safetensors").read_bytes()


def _load_or_clean_error(folder: Path, model: torch.nn.Module) -> None:
    for target in (None, model):
        try:
            update = SteeringUpdate.load(folder, target)
        except ArtifactError as exc:
            assert "\n" not in str(exc)
            continue
        assert update.form in FORMS and all(torch.isfinite(p).all() for p in update.params.values())
        if target is not None:  # what loads with a model also applies to it
            with update.apply(model, 1.0):
                model(torch.ones(1, 3, dtype=torch.long))


meta_dicts = st.fixed_dictionaries(
    {},
    optional={
        "form": st.sampled_from([*FORMS, "bias", 3]),
        "layer": st.sampled_from([0, 2, 3, 4, -1, True, "2", 2.0, 10**30]),
        "site": st.sampled_from(["model.layers.2.mlp.down_proj", "model.layers.2", "model.layers.1.mlp.down_proj",
                                 "model.layers.2.mlp", "x..y", "", "model.nope"]),
        "shapes": json_values | st.just({"lora_a": [2, 48], "lora_b": [32, 2]}),
        "hidden_size": st.sampled_from([32, 16, None, "32"]),
        "num_layers": st.sampled_from([4, 2, None, [4]]),
    },
)


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()) |
       meta_dicts.map(lambda d: json.dumps(d).encode()))
def test_random_steer_json_gives_only_artifact_errors(
    artifact: tuple[Path, bytes, bytes], model: torch.nn.Module, content: bytes
) -> None:
    folder, _, weights = artifact
    (folder / "steer.json").write_bytes(content)
    (folder / "steer.safetensors").write_bytes(weights)
    _load_or_clean_error(folder, model)


dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
tensors = st.builds(
    lambda dtype, shape, fill: torch.full(shape, fill).to(dtype),
    dtypes, st.lists(st.sampled_from([0, 1, 2, 16, 32, 48]), max_size=3).map(tuple),
    st.sampled_from([0.0, 1.0, -2.5, math.inf, math.nan]),
)


@FUZZ
@given(
    st.binary(max_size=300)
    | st.dictionaries(st.sampled_from(["lora_a", "lora_b", "delta_b", "delta_w", "other"]), tensors, max_size=3)
    .map(lambda d: save({k: v.contiguous() for k, v in d.items()}))
    | st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=8)),
)
def test_random_steer_safetensors_gives_only_artifact_errors(
    artifact: tuple[Path, bytes, bytes], model: torch.nn.Module, content: bytes | tuple[int, bytes]
) -> None:
    folder, meta, weights = artifact
    if isinstance(content, tuple):  # the valid file, cut or overwritten at some offset
        offset, patch = content
        content = weights[:offset] + patch + weights[offset + len(patch):] if offset % 2 else weights[:offset]
    (folder / "steer.json").write_bytes(meta)
    (folder / "steer.safetensors").write_bytes(content)
    _load_or_clean_error(folder, model)


def _parse_or_clean_error(path: Path, content: bytes, parse: Callable[[Path], Any]) -> Any:
    """``parse`` of ``content`` written to ``path``, or None after a one-line InputError."""
    path.write_bytes(content)
    try:
        return parse(path)
    except InputError as exc:
        assert "\n" not in str(exc)
        return None


# -- sweep.json ---------------------------------------------------------------------------------
sweep_like = st.fixed_dictionaries(
    {},
    optional={"factors": json_values | st.lists(finite, max_size=4),
              "pref_odds": json_values | st.lists(st.none() | st.floats(), max_size=4),
              "util_odds": json_values | st.lists(st.none() | st.floats(), max_size=4)},
)


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
       | sweep_like.map(lambda d: json.dumps(d).encode()))
def test_random_sweep_json_gives_only_input_errors(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    payload = _parse_or_clean_error(tmp_path_factory.getbasetemp() / "fuzz-sweep.json", content, _read_sweep)
    if payload is None:
        return
    n = len(payload["factors"])
    assert n and len(payload["pref_odds"]) == n == len(payload["util_odds"])
    assert all(isinstance(f, (int, float)) and math.isfinite(f) for f in payload["factors"])


# -- experiment.yaml ------------------------------------------------------------------------------
config_like = st.fixed_dictionaries(
    {},
    optional={
        "name": json_values,
        "methods": st.lists(st.sampled_from(["split", "sft", "reps", "diffmean", "dpo"]), max_size=3) | json_values,
        "forms": st.lists(st.sampled_from([*FORMS, "bias"]), max_size=3) | json_values,
        "layers": st.lists(st.integers(-3, 40), max_size=3) | json_values,
        "runs": st.none() | st.lists(st.dictionaries(st.sampled_from(["method", "form", "layer", "name"]),
                                                     json_values, max_size=3), max_size=3),
        "train": st.dictionaries(st.sampled_from(["epochs", "lr", "factors", "weights", "limit", "x"]),
                                 json_values, max_size=3),
        "sweep": st.dictionaries(st.sampled_from(["factors", "reduction", "batch_size"]), json_values, max_size=2),
    },
)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=80).map(str.encode)
       | json_values.map(lambda v: yaml.safe_dump(v).encode()) | config_like.map(lambda d: yaml.safe_dump(d).encode()))
def test_random_experiment_yaml_gives_only_input_errors(
    tmp_path_factory: pytest.TempPathFactory, content: bytes
) -> None:
    config = _parse_or_clean_error(tmp_path_factory.getbasetemp() / "fuzz-experiment.yaml", content, load_config)
    if config is None:
        return
    assert isinstance(config, ExperimentConfig) and config.expand()


def test_any_loaded_payload_is_usable(tmp_path: Path) -> None:
    """The validators are not vacuous: a real sweep and config load."""
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"factors": [-1, 0, 1], "pref_odds": [0.1, None, 0.3], "util_odds": [1, 2, 3]}))
    assert _read_sweep(sweep)["factors"] == [-1, 0, 1]
    config = tmp_path / "e.yaml"
    config.write_text("name: t\nlayers: [1]\nforms: [vector, lora]\n")
    assert len(load_config(config).expand()) == 2
