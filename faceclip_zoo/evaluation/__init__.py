"""Evaluation of trained models (metrics that need generated images)."""
