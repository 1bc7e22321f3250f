"""Serving core: request scheduling for loaded models."""
