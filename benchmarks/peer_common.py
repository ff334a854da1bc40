"""Runs inside the peer venv (transformers 4.x): load our converted model, talk JSON lines.

splitsteer is not importable there. The model directory is the plain safetensors copy that
splitsteer's loader writes into its cache; transformers 4 reads it with two fixes:

- the config stores RoPE's base as ``rope_parameters`` (transformers 5), which transformers 4
  ignores, falling back to 10 000 instead of 100 000: we copy it into ``rope_theta``;
- the tokenizer was saved as transformers 5's ``TokenizersBackend`` class, unknown to 4.x:
  we load ``tokenizer.json`` with ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_peer_model(model_dir: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    config = AutoConfig.from_pretrained(model_dir)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(model_dir) / "tokenizer.json"),
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    tokenizer.eos_token_id = config.eos_token_id
    return model, tokenizer


def serve(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]], ready: dict[str, Any],
          out: TextIO) -> None:
    """Answer one JSON line on ``out`` per JSON command line on stdin until ``quit``."""

    def reply(payload: dict[str, Any]) -> None:
        out.write(json.dumps(payload) + "\n")
        out.flush()

    reply(ready)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.get("op")
        if op == "quit":
            return
        try:
            reply(handlers[op](command))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which records it
            reply({"error": f"{type(exc).__name__}: {exc}"})


def protocol_stdout() -> TextIO:
    """The real stdout for replies; library prints go to stderr so they cannot corrupt them."""
    out = sys.stdout
    sys.stdout = sys.stderr
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("torch", "transformers", "repeng", "steering-vectors")
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal here
            found[name] = "missing"
    return found


def now() -> float:
    return time.perf_counter()
