"""Batched, optionally steered text generation."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from .models import as_causal_lm
from .render import prompt_text
from .scoring import chunks, input_device
from .updates import Factor, SteeringUpdate


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    steering: Sequence[tuple[SteeringUpdate, Factor]] = (),
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    chat: bool | None = None,
    positions: str = "all",
) -> list[str]:
    """Generate a continuation per prompt, greedy by default, ``batch_size`` prompts at a time.

    ``steering`` lists (update, factor) pairs active during generation. With
    ``positions="answer"`` only generated tokens are steered, never the prompt.
    """
    outputs: list[str] = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # sampled decoding is reproducible under the seed
    try:
        for group in chunks(list(prompts), batch_size):
            texts = [prompt_text(tokenizer, p, chat) for p in group]
            side = tokenizer.padding_side
            tokenizer.padding_side = "left"  # generation appends on the right
            try:
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not (
                    chat if chat is not None else getattr(tokenizer, "chat_template", None) is not None))
            finally:
                tokenizer.padding_side = side
            enc = {k: v.to(input_device(model)) for k, v in enc.items()}
            # Prefill mask all False: the prompt is not steered; cached decoding steps are.
            mask = torch.zeros_like(enc["input_ids"], dtype=torch.bool) if positions == "answer" else None
            with ExitStack() as stack, torch.no_grad():
                for update, factor in steering:
                    stack.enter_context(update.apply(model, factor, token_mask=mask))
                out = as_causal_lm(model).generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_p=top_p if do_sample else None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        torch.random.set_rng_state(generator_state)
    return [o.strip() for o in outputs]
