"""``python -m splitsteer`` (also what ``accelerate launch -m splitsteer`` runs)."""

from .cli import _entry

_entry()
