"""reap-vlm: REAP expert pruning for Mixture-of-Experts vision-language models."""

__version__ = "0.1.0"
