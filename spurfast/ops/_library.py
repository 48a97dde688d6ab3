"""The ``spurfast`` torch.library namespace: op schemas are declared here once.

Schemas are Python-side so that they exist with or without the compiled extension; each
op module adds its CPU kernel (which loads the C++ extension lazily) and its fake impl.
"""
from __future__ import annotations

import torch

lib = torch.library.Library("spurfast", "DEF")


def register_fake(qualname: str):
    """``torch.library.register_fake`` (torch >= 2.4), named ``impl_abstract`` before."""
    if hasattr(torch.library, "register_fake"):
        return torch.library.register_fake(qualname)
    return torch.library.impl_abstract(qualname)  # pragma: no cover
