"""splitsteer: one dynamic weight update for steering language models, and what it costs.

The public API in one place; see the README for a tour.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .data import Pair, PairDataset, load_pairs, read_pairs, registered_datasets
from .errors import ArtifactError, InputError, ModelError, RuntimeFailure, SplitsteerError
from .generation import generate
from .models import load_model
from .sweep import parse_factors as factors
from .sweep import sweep
from .train import TrainConfig, train, train_update
from .updates import SteeringUpdate, steer


def fit(sweep_result: dict[str, Any], *, max_util_drop: float = 1.0, **options: Any) -> Any:
    """Fit the validity-decay models to a sweep (the ``sweep.json`` payload)."""
    from .analysis.decay import fit_decay

    return fit_decay(sweep_result["factors"], sweep_result["pref_odds"], sweep_result["util_odds"],
                     max_util_drop=max_util_drop, **options)


__all__ = [
    "ArtifactError", "InputError", "ModelError", "Pair", "PairDataset", "RuntimeFailure", "SplitsteerError",
    "SteeringUpdate", "TrainConfig", "factors", "fit", "generate", "load_model", "load_pairs", "read_pairs",
    "registered_datasets", "steer", "sweep", "train", "train_update",
]
