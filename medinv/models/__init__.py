"""Models composed from :mod:`medinv.invertible` parts."""

from .iunet import InvertibleUNet, IUNet

__all__ = ["IUNet", "InvertibleUNet"]
