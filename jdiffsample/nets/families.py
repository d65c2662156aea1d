"""Every network family, in one tuple: what ``config.json``'s ``family`` and ``jdiffsample convert
FAMILY`` may name. A new family is one module ending with ``FAMILY = Family(...)`` plus its line here."""

from __future__ import annotations

from jdiffsample.nets import adm, adm_classifier, adm_superres, dit, edm, edm2, flux, sd, sd3, vae
from jdiffsample.nets.family import Family

__all__ = ["FAMILIES", "get", "names"]

FAMILIES: tuple[Family, ...] = (edm.FAMILY, adm.FAMILY, adm_classifier.FAMILY, adm_superres.FAMILY, dit.FAMILY,
                                edm2.FAMILY, vae.FAMILY, sd.FAMILY, flux.FAMILY, sd3.FAMILY)
_BY_NAME = {family.name: family for family in FAMILIES}


def names() -> list[str]:
    """Names of all families, sorted."""
    return sorted(_BY_NAME)


def get(name: str) -> Family:
    """The family ``name``; ``ValueError`` naming the known ones."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown network family {name!r}; choose one of {', '.join(names())}")
    return _BY_NAME[name]
