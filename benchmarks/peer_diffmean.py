"""Peer worker for the diffmean benchmark (runs in benchmarks/.peer-venv, transformers 4.x).

Input JSON: model_dir, layer, batch_pairs, samples (list of [positive_str, negative_str], the
chat-rendered prompt + answer texts), check (token ids and answer masks of a few pairs).

Commands:
- {"op": "train", "start": i, "stop": j}: ``steering_vectors.train_steering_vector`` on
  samples[i:j] with its mean aggregator at decoder block ``layer``, reading the last token
  (its default ``read_token_index=-1``: the end-of-turn token closing the answer); returns
  the seconds inside this process and the vector.
- {"op": "answer_mean_check"}: the vector splitsteer computes (mean over answer tokens,
  difference, mean over pairs) from steering-vectors' own ``record_activations`` hook at
  decoder block ``layer``, on the exact token ids we pass. Not timed: it checks that the peer
  environment's model and layer numbering give our activations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from peer_common import load_peer_model, now, protocol_stdout, serve, versions


def main() -> None:
    out = protocol_stdout()
    setup = json.loads(Path(sys.argv[1]).read_text())
    model, tokenizer = load_peer_model(setup["model_dir"])
    layer, batch_pairs = int(setup["layer"]), int(setup["batch_pairs"])
    samples = [tuple(s) for s in setup["samples"]]

    from steering_vectors import record_activations, train_steering_vector
    from steering_vectors.aggregators import mean_aggregator

    def train(cmd: dict[str, Any]) -> dict[str, Any]:
        chunk = samples[int(cmd["start"]) : int(cmd["stop"])]
        t0 = now()
        vector = train_steering_vector(model, tokenizer, chunk, layers=[layer], layer_type="decoder_block",
                                       aggregator=mean_aggregator(), batch_size=batch_pairs,
                                       read_token_index=-1)
        seconds = now() - t0
        return {"seconds": seconds, "vector": vector.layer_activations[layer].float().tolist()}

    def answer_mean_check(_cmd: dict[str, Any]) -> dict[str, Any]:
        diffs = []
        for side_pos, side_neg in setup["check"]:
            means = []
            for side in (side_pos, side_neg):
                ids = torch.tensor([side["ids"]])
                answer = torch.tensor([side["answer_mask"]], dtype=torch.float32)
                with torch.no_grad(), record_activations(model, "decoder_block", layer_nums=[layer]) as rec:
                    model(input_ids=ids, attention_mask=torch.ones_like(ids))
                hidden = rec[layer][-1]
                means.append((hidden * answer[..., None]).sum(1) / answer.sum())
            diffs.append(means[0] - means[1])
        return {"vector": torch.cat(diffs).mean(0).tolist()}

    serve({"train": train, "answer_mean_check": answer_mean_check},
          {"ready": True, "versions": versions(), "threads": torch.get_num_threads()}, out)


if __name__ == "__main__":
    main()
