"""The command line end to end, on a tiny model saved to disk (no download)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitsteer.cli import main
from tiny import tiny_workspace


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_workspace(tmp_path_factory.mktemp("cli"), 12)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_sweep_fit_generate(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, data, art = workdir / "model", workdir / "pairs.jsonl", workdir / "art"
    code, out, err = run_cli(capsys, "train", "--model", model, "--data", data, "--layer", "1",
                             "--epochs", "2", "--batch-size", "4", "--out", art, "--json")
    assert code == 0, err
    summary = json.loads(out)
    for key in ("artifact", "method", "form", "layer", "epochs", "seconds", "examples_per_second", "final_loss"):
        assert key in summary
    assert (art / "steer.safetensors").is_file() and (art / "steer.json").is_file()
    log = (art / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch,loss") and len(log) == 1 + 2 * 3

    code, out, err = run_cli(capsys, "sweep", "--model", model, "--steer", art, "--data", data,
                             "--factors=-20:20:11", "--out", workdir / "sweep.json")
    assert code == 0, err
    sweep = json.loads((workdir / "sweep.json").read_text())
    assert sweep["factors"][5] == 0.0 and sweep["n_pairs"] == 12
    for key in ("pref_odds", "util_odds", "lp", "ln", "per_pair", "n_util_undefined"):
        assert key in sweep

    code, out, err = run_cli(capsys, "fit", workdir / "sweep.json", "--out", workdir / "fit.json",
                             "--plot", workdir / "fit.png", "--json")
    assert code == 0, err
    fit = json.loads(out)
    assert {"preference", "utility", "breakdown", "recommended_factor"} <= set(fit)
    assert (workdir / "fit.png").stat().st_size > 1000

    code, out, err = run_cli(capsys, "generate", "--model", model, "--steer", art, "--factor", "4",
                             "--prompt", "Tell me about the sea", "--prompt", "Hi", "--max-new-tokens", "5", "--json")
    assert code == 0, err
    assert len(json.loads(out)["generations"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "/nonexistent.jsonl", "--out", "x"], "nor an existing file"),
        (["train", "--method", "dpo", "--out", "x"], "unknown method"),
        (["train", "--form", "bias", "--out", "x"], "unknown form"),
        (["sweep", "--steer", "x", "--out", "y", "--factors", "a:b"], "--factors"),
        (["fit", "/nonexistent/sweep.json"], "sweep file not found"),
        (["train", "--weights", "lp=x", "--out", "x"], "--weights"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_layer_out_of_range_names_the_option(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "train", "--model", workdir / "model", "--data", workdir / "pairs.jsonl",
                           "--layer", "9", "--out", workdir / "never")
    assert code == 2 and "--layer 9 is out of range" in err
    assert not (workdir / "never").exists()


def test_console_script_help_and_exit_code() -> None:
    ok = subprocess.run([sys.executable, "-m", "splitsteer", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "train" in ok.stdout and "sweep" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "splitsteer", "fit", "/nope.json"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "splitsteer: error: /nope.json: sweep file not found"
