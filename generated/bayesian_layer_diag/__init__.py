"""bayesian_layer_diag: generated chunked forward kernels (kalman family)."""
from .kernels import forward

__all__ = ["forward"]
