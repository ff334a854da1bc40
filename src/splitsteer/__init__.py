"""splitsteer: one dynamic weight update for steering language models, and what it costs."""

__version__ = "0.1.0"
