"""Models composed from :mod:`medinv.invertible` parts."""

from .factory import build_model
from .irim import IRIM
from .iunet import InvertibleUNet, IUNet
from .rim import RIM

__all__ = ["IRIM", "RIM", "IUNet", "InvertibleUNet", "build_model"]
