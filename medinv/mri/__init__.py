"""k-space: FFT conventions, masks, coil maps, SENSE operators and fastMRI HDF5 files.

Depends on torch and NumPy; h5py is imported by :mod:`medinv.mri.io` only, which is not
imported here.
"""

from medinv.mri.coils import (
    acs_sensitivities,
    birdcage_maps,
    espirit_maps,
    normalize_sensitivities,
)
from medinv.mri.fft import center_crop, fft2c, ifft2c, rss
from medinv.mri.masks import (
    EquispacedMaskFractionFunc,
    EquispacedMaskFunc,
    Mask,
    MaskFunc,
    RandomMaskFunc,
    apply_mask,
    create_mask_func,
    sampled_fraction,
    seed_from_name,
)
from medinv.mri.operators import SenseOperator, SingleCoilOperator

__all__ = [
    "EquispacedMaskFractionFunc",
    "EquispacedMaskFunc",
    "Mask",
    "MaskFunc",
    "RandomMaskFunc",
    "SenseOperator",
    "SingleCoilOperator",
    "apply_mask",
    "birdcage_maps",
    "center_crop",
    "create_mask_func",
    "acs_sensitivities",
    "espirit_maps",
    "fft2c",
    "ifft2c",
    "normalize_sensitivities",
    "rss",
    "sampled_fraction",
    "seed_from_name",
]
