"""Models composed from :mod:`medinv.invertible` parts."""

from .factory import build_model
from .iunet import InvertibleUNet, IUNet

__all__ = ["IUNet", "InvertibleUNet", "build_model"]
