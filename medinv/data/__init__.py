"""Datasets, transforms, manifests and sample data.

Submodules are imported explicitly (``from medinv.data.anatomy import require_anatomy``),
so that importing this package does not import MONAI.
"""
