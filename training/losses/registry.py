"""Name -> constructor for the SSL companions of the improved-CLIP recipe, and ``build_ssl``.

A config section looks like ``{name: barlip, weight: 1.0, proj_dim: 8192, ...}``; every key other
than ``name`` is a keyword argument of the companion (see :mod:`training.losses.ssl` for the
parameters and their defaults). ``name: none`` (or no section) means no companion.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch.nn as nn

from training.losses.ssl import BYOLIP, SLIP, BarLIP, SiamLIP, SwALIP

__all__ = ["SSL_COMPANIONS", "build_ssl"]

SSL_COMPANIONS: dict[str, type[nn.Module]] = {
    "barlip": BarLIP,
    "siamlip": SiamLIP,
    "byolip": BYOLIP,
    "swalip": SwALIP,
    "slip": SLIP,
}


def build_ssl(cfg: Mapping | None, dim) -> nn.Module | None:
    """The companion described by ``cfg`` for features of size ``dim`` (int or (d_img, d_txt)).

    Returns None for ``cfg`` None/empty or ``name`` none/null. Unknown names and unknown
    parameters raise ``ValueError`` naming the allowed ones.
    """
    if not cfg:
        return None
    if not isinstance(cfg, Mapping):
        raise ValueError(f"ssl config must be a mapping like {{name: barlip, weight: 1.0}}, got {cfg!r}")
    params = dict(cfg)
    name = params.pop("name", None)
    if name is None or str(name).lower() == "none":
        return None
    key = str(name).lower()
    if key not in SSL_COMPANIONS:
        raise ValueError(f"unknown ssl companion {name!r}; choose one of {sorted(SSL_COMPANIONS)} or none")
    cls = SSL_COMPANIONS[key]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "dim")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for ssl companion {key!r}; allowed: {allowed}")
    return cls(dim, **params)
