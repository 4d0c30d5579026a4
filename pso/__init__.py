"""Core library for online Pairwise Sample Optimization of few-step diffusion models."""

__version__ = "0.1.0"
