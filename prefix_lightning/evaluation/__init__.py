"""Scorers for generated text."""

from prefix_lightning.evaluation.bleu import corpus_bleu

__all__ = ["corpus_bleu"]
