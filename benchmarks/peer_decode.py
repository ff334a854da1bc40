"""Peer worker for the decode benchmark (runs in benchmarks/.peer-venv, transformers 4.x).

Input JSON: model_dir, prompts (chat-templated texts), vector (list), layer, factor,
max_new_tokens, batch_size. Commands: {"op": "unsteered" | "repeng" | "steering_vectors"};
each generates greedily for all prompts, exactly as splitsteer.generation.generate calls
``model.generate``, tokenising and decoding inside the timed region on both sides.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peer_common import load_peer_model, now, protocol_stdout, serve, versions


def main() -> None:
    out = protocol_stdout()
    setup = json.loads(Path(sys.argv[1]).read_text())
    model, tokenizer = load_peer_model(setup["model_dir"])
    model.generation_config.eos_token_id = None  # every run generates exactly max_new_tokens
    layer, factor = int(setup["layer"]), float(setup["factor"])
    vector = torch.tensor(setup["vector"], dtype=torch.float32)
    prompts: list[str] = setup["prompts"]
    batch_size = int(setup["batch_size"])

    from repeng import ControlModel, ControlVector
    from steering_vectors import SteeringVector

    control = ControlVector(model_type=model.config.model_type, directions={layer: vector.numpy().astype(np.float32)})
    steering = SteeringVector(layer_activations={layer: vector}, layer_type="decoder_block")

    def generate(target: Any, ctx: Any = None) -> tuple[list[str], int]:
        texts: list[str] = []
        tokens = 0
        tokenizer.padding_side = "left"
        with torch.no_grad(), (ctx or nullcontext()):
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False)
                out_ids = target.generate(**enc, max_new_tokens=setup["max_new_tokens"], do_sample=False,
                                          temperature=None, top_p=None, top_k=None,
                                          pad_token_id=tokenizer.pad_token_id)
                new = out_ids[:, enc["input_ids"].shape[1] :]
                tokens += int(new.numel())
                texts.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
        return texts, tokens

    def unsteered(_cmd: dict[str, Any]) -> dict[str, Any]:
        t0 = now()
        texts, tokens = generate(model)
        return {"seconds": now() - t0, "tokens": tokens, "first": texts[0]}

    def with_repeng(_cmd: dict[str, Any]) -> dict[str, Any]:
        t0 = now()
        wrapped = ControlModel(model, [layer])  # repeng wraps the layer in place
        wrapped.set_control(control, coeff=factor)
        try:
            texts, tokens = generate(wrapped)
        finally:
            wrapped.reset()
            wrapped.unwrap()
        return {"seconds": now() - t0, "tokens": tokens, "first": texts[0]}

    def with_steering_vectors(_cmd: dict[str, Any]) -> dict[str, Any]:
        t0 = now()
        texts, tokens = generate(model, steering.apply(model, multiplier=factor))
        return {"seconds": now() - t0, "tokens": tokens, "first": texts[0]}

    serve({"unsteered": unsteered, "repeng": with_repeng, "steering_vectors": with_steering_vectors},
          {"ready": True, "versions": versions(), "threads": torch.get_num_threads()}, out)


if __name__ == "__main__":
    main()
