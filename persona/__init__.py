"""persona-rlhf: train chatbots that keep a persona, as a reproducible DVC pipeline."""
__version__ = "0.1.0"
