"""Building an ACIP model from a base causal LM: the one entry, :func:`parametrize`."""

from .whitening import parametrize

__all__ = ["parametrize"]
