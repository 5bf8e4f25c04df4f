"""timm architectures for the zoo matrix (``benchmarks/zoo.py``), as a bscompress arch spec.

    bscompress inspect benchmarks/zoo_timm.py:timm_model --arch-kwargs '{"name": "resnet18"}'

Random weights only: ``pretrained=False``, so nothing is downloaded. An archive written from
this spec names the file; it reloads without ``--trust-code`` on the machine that wrote it
(bscompress signs the architectures of the archives it writes) and needs ``--trust-code``
elsewhere.
"""

from __future__ import annotations

from typing import Any


def timm_model(name: str, **kwargs: Any):
    """``timm.create_model(name, pretrained=False, **kwargs)``."""
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)
