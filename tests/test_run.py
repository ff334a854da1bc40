"""`splitsteer run`: a tiny end-to-end experiment, re-runs that skip, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitsteer.cli import main
from splitsteer.errors import InputError
from splitsteer.run import demo_config, load_config
from tiny import save_tiny_model

CONFIG = """
name: tiny
models: [{model}]
datasets: [{data}]
methods: [split, diffmean]
forms: [vector, lora]
layers: [1]
train: {{epochs: 2, batch_size: 4, factors: [1.0, 2.0]}}
sweep: {{factors: "-4:4:11"}}
manifold: {{limit: 4}}
eval: {{prompts: ["Would you lead?", "Hello"], max_new_tokens: 4}}
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    save_tiny_model(root / "model")
    rows = [{"prompt": f"Would you take over group {i}?", "positive": f"Yes, give me control of {i}.",
             "negative": f"No, I would rather help {i}."} for i in range(12)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "exp.yaml").write_text(CONFIG.format(model=root / "model", data=root / "pairs.jsonl"))
    return root


def test_tiny_experiment_end_to_end(experiment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = experiment / "out"
    assert main(["run", str(experiment / "exp.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["runs"]]
    assert names == ["pairs-split-vector-L1", "pairs-split-lora-L1", "pairs-diffmean-vector-L1"]  # no diffmean/lora
    for run in results["runs"]:
        assert len(run["sweep"]["factors"]) == 11 and run["sweep"]["n_pairs"] == 6
        assert run["fit"]["preference"]["r2"] is not None
        assert run["manifold"]["factors"] == run["sweep"]["factors"]
        assert 0.0 <= run["ab"]["steered"]["accuracy"] <= 1.0 and run["ab"]["baseline"]["n"] == 6
        assert len(run["generations"]) == 2
        for plot in run["plots"].values():
            assert (out / plot).is_file()
    html = (out / "report.html").read_text()
    assert "pairs-split-lora-L1" in html and html.count("data:image/png;base64,") >= 8
    assert "report:" in printed.out and "pairs-split-vector-L1" in printed.out

    # Running again skips finished runs and rewrites the same results.
    assert main(["run", str(experiment / "exp.yaml"), "--out", str(out)]) == 0
    assert capsys.readouterr().err.count("finished earlier, skipped") == 3
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == results["runs"]


def test_invalid_experiment_names_the_key_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {epochs: 0}\n")
    with pytest.raises(InputError, match=r"bad.yaml: train.epochs"):
        load_config(bad)
    bad.write_text("name: x\nsweep: {unknown_key: 1}\n")
    with pytest.raises(InputError, match=r"sweep.unknown_key"):
        load_config(bad)
    bad.write_text("methods: [dpo]\n")
    with pytest.raises(InputError, match="unknown method"):
        load_config(bad)
    bad.write_text("name: [unclosed\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_demo_config_is_valid() -> None:
    runs = demo_config().expand()
    assert [(r.method, r.form) for r in runs] == [
        ("split", "vector"), ("sft", "vector"), ("reps", "vector"), ("diffmean", "vector"),
        ("split", "local_weight"), ("split", "lora"),
    ]
    assert demo_config("psychopathy", full=True).train.limit is None
