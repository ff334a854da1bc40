"""Scale: big-model loading with offloaded layers, and parallel experiment workers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from splitsteer.data import Pair
from splitsteer.generation import generate
from splitsteer.models import load_model
from splitsteer.run import load_config, run_experiment
from splitsteer.sweep import sweep_losses
from splitsteer.train import TrainConfig, train_update
from test_run import CONFIG
from tiny import tiny_llama, tiny_tokenizer

PAIRS = [Pair(f"Would you take charge {i}?", f"Yes, me {i}.", f"No, not me {i}.") for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model")
    model, tok = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_offloaded_layers_train_sweep_and_generate_like_the_plain_model(model_dir: Path, tmp_path: Path) -> None:
    """Half the decoder layers offloaded to disk (accelerate hooks load them per call)."""
    plain, tok = load_model(str(model_dir))
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded, _ = load_model(str(model_dir), device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert offloaded.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    cfg = TrainConfig(method="split", form="lora", layer=1, epochs=2, batch_size=4, lr=0.02, factors=[1.0, 2.0])
    a, b = train_update(plain, tok, PAIRS, cfg), train_update(offloaded, tok, PAIRS, cfg)
    assert [r["loss"] for r in a.log] == [r["loss"] for r in b.log]
    for name in a.update.params:
        torch.testing.assert_close(a.update.params[name], b.update.params[name], atol=1e-6, rtol=1e-6)
    lp_a, ln_a = sweep_losses(plain, tok, [a.update], PAIRS, [-2.0, 0.0, 2.0])
    lp_b, ln_b = sweep_losses(offloaded, tok, [a.update], PAIRS, [-2.0, 0.0, 2.0])
    np.testing.assert_allclose(lp_a, lp_b, atol=1e-6)
    np.testing.assert_allclose(ln_a, ln_b, atol=1e-6)
    steering = [(a.update, 2.0)]
    assert generate(plain, tok, ["Hello"], steering=steering, max_new_tokens=4) == \
        generate(offloaded, tok, ["Hello"], steering=steering, max_new_tokens=4)


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in ("seconds", "examples_per_second")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
    return a == b


def test_parallel_workers_match_a_serial_run(model_dir: Path, tmp_path: Path) -> None:
    rows = [{"prompt": f"Would you take over group {i}?", "positive": f"Yes, give me control of {i}.",
             "negative": f"No, I would rather help {i}."} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = CONFIG.format(model=model_dir, data=tmp_path / "pairs.jsonl").replace("[split, diffmean]", "[split]")
    (tmp_path / "exp.yaml").write_text(text.replace("manifold: {limit: 4}", "manifold: {enabled: false}"))
    config = load_config(tmp_path / "exp.yaml")
    serial = run_experiment(config, tmp_path / "serial")
    parallel = run_experiment(config, tmp_path / "parallel", workers=2)
    assert [r["name"] for r in parallel["runs"]] == [r["name"] for r in serial["runs"]]
    assert _close(_without_timings(parallel["runs"]), _without_timings(serial["runs"]))
    assert (tmp_path / "parallel" / "report.html").is_file()
