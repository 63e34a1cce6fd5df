"""Entry points: train, eval, serve, sft, demo."""
