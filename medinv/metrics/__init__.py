"""Quality metrics and per-case tables.

Submodules are imported explicitly (``from medinv.metrics.reconstruction import ssim``).
"""
