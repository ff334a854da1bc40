"""Turn (prompt, answer) texts into token ids with labels on the answer tokens only.

Instruct models get their chat template (prompt as the user turn, answer as the assistant
turn, end-of-turn token included in the labels); base models get plain text. The prompt
and the answer are tokenised separately so the boundary between them is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import InputError
from .models import is_chat_model

IGNORE = -100
PaddingSide = Literal["right", "left"]
#: What to do when a prompt plus answer is longer than the model's context.
TruncationPolicy = Literal["error", "left"]


@dataclass(frozen=True)
class Rendered:
    """One example: ``ids`` = prompt tokens + answer tokens."""

    ids: tuple[int, ...]
    prompt_len: int

    @property
    def answer_len(self) -> int:
        return len(self.ids) - self.prompt_len


def prompt_text(tokenizer: Any, prompt: str, chat: bool | None = None) -> str:
    """The text a model sees before its answer (generation prompt included for chat)."""
    if chat if chat is not None else is_chat_model(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


def _answer_text(tokenizer: Any, prompt: str, answer: str, chat: bool) -> str:
    if not chat:
        # Plain text: keep one separator so "Question?Answer" doesn't fuse into one word.
        needs_space = prompt and not prompt[-1].isspace() and not answer[:1].isspace()
        return (" " if needs_space else "") + answer
    before = prompt_text(tokenizer, prompt, chat=True)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(before):
        raise InputError("the chat template renders the prompt differently with an answer; use --plain")
    # Keep the end-of-turn token, drop the template's trailing newline after it.
    return full[len(before):].rstrip("\n")


def render(
    tokenizer: Any,
    prompt: str,
    answer: str,
    *,
    chat: bool | None = None,
    max_length: int | None = None,
    truncation: TruncationPolicy = "error",
) -> Rendered:
    """Render one (prompt, answer). ``max_length`` defaults to no limit.

    Truncation policy: ``error`` rejects an example longer than ``max_length``; ``left``
    drops prompt tokens from the left (the answer is never cut).
    """
    chat = is_chat_model(tokenizer) if chat is None else chat
    before = prompt_text(tokenizer, prompt, chat)
    # Chat templates write their own special tokens (e.g. <bos>); plain text gets the
    # tokenizer's usual ones on the prompt only.
    prompt_ids = tokenizer(before, add_special_tokens=not chat)["input_ids"]
    answer_ids = tokenizer(_answer_text(tokenizer, prompt, answer, chat), add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise InputError(f"empty answer after tokenisation for prompt {prompt[:40]!r}")
    ids = list(prompt_ids) + list(answer_ids)
    if max_length is not None and len(ids) > max_length:
        if truncation == "error" or len(answer_ids) >= max_length:
            raise InputError(
                f"example of {len(ids)} tokens is longer than the model context of {max_length} "
                f"(prompt {prompt[:40]!r}); use --truncate left to cut prompts from the left"
            )
        cut = len(ids) - max_length
        prompt_ids = prompt_ids[cut:]
        ids = list(prompt_ids) + list(answer_ids)
    return Rendered(ids=tuple(ids), prompt_len=len(prompt_ids))


@dataclass
class Batch:
    """Padded token batch; ``labels`` hold the answer tokens and ``IGNORE`` elsewhere."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    #: True at answer tokens (the positions steered when steering "after the prompt").
    answer_mask: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        # Positions count real tokens only, so left and right padding give the same values.
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.answer_mask)))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def collate(rows: Sequence[Rendered], pad_id: int, padding_side: PaddingSide = "right") -> Batch:
    width = max(len(r.ids) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    answer = torch.zeros((n, width), dtype=torch.bool)
    for i, row in enumerate(rows):
        start = 0 if padding_side == "right" else width - len(row.ids)
        span = slice(start, start + len(row.ids))
        input_ids[i, span] = torch.tensor(row.ids)
        attention[i, span] = 1
        labels[i, start + row.prompt_len : start + len(row.ids)] = torch.tensor(row.ids[row.prompt_len:])
        answer[i, start + row.prompt_len : start + len(row.ids)] = True
    return Batch(input_ids, attention, labels, answer)


def render_pairs(
    tokenizer: Any,
    pairs: Sequence[Any],
    *,
    chat: bool | None = None,
    max_length: int | None = None,
    truncation: TruncationPolicy = "error",
) -> list[tuple[Rendered, Rendered]]:
    """Render each pair's positive and negative answers after its prompt."""
    return [
        (
            render(tokenizer, p.prompt, p.positive, chat=chat, max_length=max_length, truncation=truncation),
            render(tokenizer, p.prompt, p.negative, chat=chat, max_length=max_length, truncation=truncation),
        )
        for p in pairs
    ]


def pair_batch(
    rendered: Sequence[tuple[Rendered, Rendered]], pad_id: int, padding_side: PaddingSide = "right"
) -> Batch:
    """Rows ``[pos_0, neg_0, pos_1, neg_1, ...]``: both answers of a pair side by side."""
    return collate([row for pair in rendered for row in pair], pad_id, padding_side)


def pad_id(tokenizer: Any) -> int:
    value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(value if value is not None else 0)


def context_length(model: Any) -> int | None:
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
