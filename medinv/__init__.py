"""Memory-efficient invertible networks for medical imaging on MONAI and PyTorch.

Subpackages are imported explicitly (``import medinv.invertible``), so that importing
``medinv`` itself stays cheap.
"""

__version__ = "0.1.0"
