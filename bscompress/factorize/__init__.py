"""Pure tensor math of the factorizations (no ``torch.nn`` modules here).

Shapes: a conv weight is ``[N, M/g, *kernel]`` with N output channels, M input channels, g
groups and K = prod(kernel).
"""

from bscompress.factorize.spectra import (
    blueprint_spectrum,
    depthwise_spectrum,
    kept_energy,
    tucker2_kept_energy,
)

__all__ = ["blueprint_spectrum", "depthwise_spectrum", "kept_energy", "tucker2_kept_energy"]
