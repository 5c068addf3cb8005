"""Diffiner: diffusion-based refinement of enhanced speech (Sawata et al., INTERSPEECH 2023)."""

__version__ = "0.1.0"
