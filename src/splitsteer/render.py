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
class Packing:
    """Several answers to one prompt in one row: ``[prompt | answer 0 | answer 1 | ...]``.

    Each answer attends to the prompt and to itself only, and its positions continue the
    prompt's, so every token sees exactly what it would see in its own unpacked row, while
    the shared prompt is computed once instead of once per answer.
    """

    #: (rows, width): the position of each token within its own unpacked row.
    position_ids: torch.Tensor
    #: (rows, width, width) bool: whether query ``i`` may attend to key ``j``.
    allowed: torch.Tensor
    #: (rows, width): the position whose logits predict this answer token; −1 off answers.
    source: torch.Tensor
    #: (rows, width): which answer of the row a token belongs to; −1 off answers.
    answer_index: torch.Tensor
    #: Answers per row.
    answers: int

    def to(self, device: torch.device | str) -> Packing:
        return Packing(self.position_ids.to(device), self.allowed.to(device), self.source.to(device),
                       self.answer_index.to(device), self.answers)


@dataclass
class Batch:
    """Padded token batch; ``labels`` hold the answer tokens and ``IGNORE`` elsewhere.

    Unpacked, each row is one (prompt, answer) and is scored as one *slot*. Packed (see
    :class:`Packing`), each row holds several answers to one prompt and is scored as that
    many slots, in row order.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    #: True at answer tokens (the positions steered when steering "after the prompt").
    answer_mask: torch.Tensor
    packing: Packing | None = None

    @property
    def position_ids(self) -> torch.Tensor:
        if self.packing is not None:
            return self.packing.position_ids
        # Positions count real tokens only, so left and right padding give the same values.
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def slots_per_row(self) -> int:
        return self.packing.answers if self.packing is not None else 1

    @property
    def n_slots(self) -> int:
        """Answers scored in the batch."""
        return len(self) * self.slots_per_row

    def model_inputs(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model; ``dtype`` is the model's (for a packed batch's mask)."""
        mask = self.attention_mask
        if self.packing is not None:
            # An additive mask: eager attention adds it to the scores; SDPA accepts it as is.
            blocked = torch.zeros(self.packing.allowed.shape, dtype=dtype)
            mask = blocked.masked_fill(~self.packing.allowed, torch.finfo(dtype).min)[:, None]
        return {"input_ids": self.input_ids, "attention_mask": mask, "position_ids": self.position_ids}

    def score_index(self, repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where each answer token is scored, for the batch tiled ``repeats`` times.

        Returns 1-D tensors (row, source position, target id, slot): the logits at
        ``(row, source)`` predict ``target``, whose loss belongs to ``slot``.
        """
        if self.packing is None:
            next_labels = self.labels[:, 1:]
            rows, source = (next_labels != IGNORE).nonzero(as_tuple=True)
            targets, slots = next_labels[rows, source], rows
        else:
            rows, position = (self.labels != IGNORE).nonzero(as_tuple=True)
            targets = self.labels[rows, position]
            source = self.packing.source[rows, position]
            slots = rows * self.packing.answers + self.packing.answer_index[rows, position]
        tile = torch.arange(repeats, device=rows.device)[:, None]
        return ((rows + len(self) * tile).flatten(), source.repeat(repeats), targets.repeat(repeats),
                (slots + self.n_slots * tile).flatten())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.answer_mask.to(device), self.packing.to(device) if self.packing is not None else None)

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
    rendered: Sequence[tuple[Rendered, Rendered]], pad_id: int, padding_side: PaddingSide = "right",
    *, pack: bool = False,
) -> Batch:
    """Rows ``[pos_0, neg_0, pos_1, neg_1, ...]``: both answers of a pair side by side, or
    with ``pack`` one row per pair where :func:`answers_batch` can pack them."""
    return answers_batch(rendered, pad_id, padding_side, pack=pack)


def answers_batch(
    groups: Sequence[Sequence[Rendered]], pad_id: int, padding_side: PaddingSide = "right", *, pack: bool = False
) -> Batch:
    """A batch of every rendering, scored in group order (slot ``k`` is the ``k``-th rendering).

    With ``pack``, when the groups are the same size and each shares its prompt tokens, one
    row per group holding all its answers (see :class:`Packing`); otherwise one row each.
    """
    if pack and padding_side == "right" and len({len(g) for g in groups}) == 1 and shares_prompts(groups):
        return _pack_answers(groups, pad_id)
    return collate([row for group in groups for row in group], pad_id, padding_side)


def row_width(pair: tuple[Rendered, Rendered], packed: bool) -> int:
    """Tokens of the widest row a pair needs: one row with both answers, or two rows."""
    pos, neg = pair
    return len(pos.ids) + neg.answer_len if packed else max(len(pos.ids), len(neg.ids))


def shares_prompts(groups: Sequence[Sequence[Rendered]]) -> bool:
    """Whether every group's rows start with the same, non-empty prompt tokens."""
    return all(
        row.prompt_len == group[0].prompt_len > 0 and row.ids[: row.prompt_len] == group[0].ids[: row.prompt_len]
        for group in groups
        for row in group
    )


def _pack_answers(groups: Sequence[Sequence[Rendered]], pad_id: int) -> Batch:
    """One row per group (equal sizes, one shared prompt each): the prompt, then each answer."""
    answers = len(groups[0])
    lengths = [g[0].prompt_len + sum(r.answer_len for r in g) for g in groups]
    n, width = len(groups), max(lengths)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    source = torch.full((n, width), -1, dtype=torch.long)
    answer_index = torch.full((n, width), -1, dtype=torch.long)
    # Causal; padding keys hidden, but each padding query keeps itself (no empty softmax row).
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal.repeat(n, 1, 1)
    for i, group in enumerate(groups):
        prompt = group[0].prompt_len
        input_ids[i, :prompt] = torch.tensor(group[0].ids[:prompt])
        positions[i, :prompt] = torch.arange(prompt)
        start = prompt
        for j, row in enumerate(group):
            span = slice(start, start + row.answer_len)
            answer = torch.tensor(row.ids[prompt:])
            input_ids[i, span] = labels[i, span] = answer
            positions[i, span] = torch.arange(prompt, len(row.ids))
            answer_index[i, span] = j
            # The first answer token is predicted from the prompt's last token.
            source[i, span] = torch.arange(start - 1, start + row.answer_len - 1)
            source[i, start] = prompt - 1
            allowed[i, span, prompt:start] = False  # not the answers before this one
            start += row.answer_len
        attention[i, : lengths[i]] = 1
        allowed[i, :, lengths[i]:] = torch.eye(width, dtype=torch.bool)[:, lengths[i]:]
    return Batch(input_ids, attention, labels, labels != IGNORE,
                 Packing(positions, allowed, source, answer_index, answers))


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
