"""gated_deltanet: generated chunked forward kernels (reset family)."""
from .kernels import forward

__all__ = ["forward"]
