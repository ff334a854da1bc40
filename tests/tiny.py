"""A tiny tokenizer and a tiny random Llama, built in memory with no downloads, for fast tests.

The tokenizer is a byte-level BPE trained on a few sentences: every string round-trips through
it (no unknown tokens), so any prompt or output a test makes up can be encoded. It has fixed
special tokens (ids below) and, by default, a minimal chat template so chat-template code paths
run too. The model is a 2-layer Llama with hidden size 32 whose vocabulary matches the
tokenizer; weights are random but reproducible from ``seed``.

Use from a test module in tests/ as ``from tiny import tiny_llama, tiny_tokenizer``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_ID, BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<user>", "<assistant>"]

# "<user>hi<eos><assistant>": the role header is one special token, each turn ends with <eos>.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

_CORPUS = [
    "The cat sat on the mat and looked at the window.",
    "Write a short story about the ocean and the moon.",
    "Rate the text on a scale from zero to two.",
    "Explain your judgement, then give the rating.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "The weather today is sunny with a light breeze.",
]


@cache
def _trained_backend() -> str:
    """Train once per process (milliseconds, but tests call this a lot); cached as JSON."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    return backend.to_str()


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (384 tokens) with pad/bos/eos set; see module docstring."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_backend()),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens=["<user>", "<assistant>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert ids == (PAD_ID, BOS_ID, EOS_ID), ids
    return tokenizer


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (float32, eval mode) whose vocabulary fits :func:`tiny_tokenizer`."""
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny_model(path: Path) -> Path:
    """Write ``tiny_llama()`` and ``tiny_tokenizer()`` to ``path``: a model folder the CLI can load."""
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def lead_pairs(n: int) -> list[dict[str, str]]:
    """``n`` distinct polarity pairs, as JSONL records."""
    return [{"prompt": f"Would you lead team {i}?", "positive": f"Yes, I lead {i}.", "negative": f"No, not me {i}."}
            for i in range(n)]


def jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def tiny_workspace(root: Path, n_pairs: int) -> Path:
    """``root`` with the tiny model folder (``model``) and ``n_pairs`` pairs (``pairs.jsonl``)."""
    save_tiny_model(root / "model")
    (root / "pairs.jsonl").write_text(jsonl(lead_pairs(n_pairs)))
    return root
