"""Safe loading: only safetensors and JSON are read, no model code runs unless asked, pinned
downloads, and nothing is written outside --out and the cache."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from splitsteer.cli import main
from splitsteer.data import dataset_info, registered_datasets
from splitsteer.errors import ModelError
from splitsteer.models import load_model
from tiny import tiny_llama, tiny_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "splitsteer"
#: Ways to run code while reading a file: unpickling, and model code from a repository.
FORBIDDEN = {
    "torch.load": re.compile(r"\btorch\.load\b"),
    "pickle": re.compile(r"\b(c?pickle|dill|joblib)\b"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
}


def test_no_unsafe_loading_in_the_sources() -> None:
    sources = sorted(SRC.rglob("*.py"))
    assert len(sources) > 10
    found = [f"{path.relative_to(SRC)}:{number}: {name}"
             for path in sources
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             for name, pattern in FORBIDDEN.items() if pattern.search(line)]
    assert not found, found


def test_remote_code_is_off_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model folder that names its own classes (auto_map) is refused, and its code never runs."""
    folder = tmp_path / "custom"
    tiny_tokenizer().save_pretrained(folder)
    config = {"model_type": "custom-llama", "architectures": ["CustomForCausalLM"],
              "auto_map": {"AutoConfig": "modeling_custom.CustomConfig",
                           "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "EXECUTED"
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    with pytest.raises(ModelError, match="--trust-remote-code"):
        load_model(str(folder))
    assert main(["generate", "--model", str(folder), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --trust-remote-code only if you trust it" in err
    assert not marker.exists()


def test_pickled_weights_are_never_unpickled(tmp_path: Path) -> None:
    """A model folder whose only weights are a pytorch_model.bin (a pickle) is refused unread."""
    folder, marker = tmp_path / "bin-only", tmp_path / "UNPICKLED"
    tiny_llama().config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return open, (str(marker), "w")  # unpickling this creates the marker file

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(str(folder))
    assert not marker.exists()


def test_every_registered_file_is_pinned_to_a_sha256() -> None:
    # Downloads are checked against these (tests/test_data.py: tampered downloads are refused).
    for name in registered_datasets():
        info = dataset_info(name)
        for file in filter(None, (info.train_file, info.test_file)):
            assert re.fullmatch(r"[0-9a-f]{64}", file.sha256), (name, file.path)


SCRIPT = """
import sys
from splitsteer.cli import main
model, data, out = sys.argv[1:4]
common = ["--model", model, "--data", data, "--batch-size", "4"]
assert main(["train", *common, "--layer", "1", "--epochs", "2", "--out", out + "/art"]) == 0
assert main(["sweep", *common, "--steer", out + "/art", "--factors=-2:2:3", "--out", out + "/sweep.json"]) == 0
"""


def test_nothing_is_written_outside_out_and_the_cache(tmp_path: Path) -> None:
    inputs, home, cache, cwd, tmp, out = (tmp_path / n for n in ("inputs", "home", "cache", "cwd", "tmp", "out"))
    for folder in (home, cache, cwd, tmp):
        folder.mkdir()
    tiny_llama().save_pretrained(inputs / "model")
    tiny_tokenizer().save_pretrained(inputs / "model")
    rows = [{"prompt": f"Lead team {i}?", "positive": f"Yes {i}.", "negative": f"No {i}."} for i in range(8)]
    (inputs / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = _tree(tmp_path)

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "XDG_", "TRANSFORMERS_", "TORCH", "MPL", "SPLITSTEER_"))}
    env.update(HOME=str(home), SPLITSTEER_CACHE=str(cache), TMPDIR=str(tmp), HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(inputs / "model"), str(inputs / "pairs.jsonl"), str(out)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr

    added = sorted(set(_tree(tmp_path)) - set(before))
    outside = [p for p in added if not p.startswith(("out/", "cache/")) and p != "out"]
    assert not outside, outside
    assert "out/art/steer.safetensors" in added and "out/sweep.json" in added


def _tree(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*")]
