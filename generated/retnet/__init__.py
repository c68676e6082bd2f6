"""retnet: generated chunked forward kernels (write family)."""
from .kernels import forward

__all__ = ["forward"]
