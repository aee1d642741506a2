"""The settings of the reference layers normstats reproduces, in normstats' own terms.

A trained BatchNorm or Center layer's buffers depend on options its code fixed:
the BatchNorm's eps, moving-average weight and variance estimator, the Center's
update rule and weight. Each :class:`Reference` holds them as the layer's
source had them, translated into normstats' options, where ``alpha`` is always
the weight of the new data (the Pytorch_Ext Center's own ``alpha = 0.9`` weights
its old centers, so each sample enters with ``1 - 0.9 = 0.1``):

==================  ==========================================  =================================
reference           BatchNorm (fit-bn)                          Center (fit-centers)
==================  ==========================================  =================================
pytorch-ext         eps 1e-5, alpha 0.01, ddof 1 (unbiased)     per-sample, alpha 0.1 (1 - 0.9)
pytorch-ext-0.8     eps 1e-5, alpha 0.1, ddof 1 (unbiased)      per-sample, alpha 0.1 (1 - 0.9)
dandelion           eps 1e-4, alpha 0.1, ddof 0 (Theano var)    per-sample, alpha 0.1
==================  ==========================================  =================================

Pytorch_Ext's BatchNorm takes ``x.var`` (torch: unbiased) and its Center adds
``(alpha - 1) * (C[labels] - f)`` per row with ``index_add_``; Dandelion's
BatchNorm takes Theano's ``var`` (biased) and its Center adds
``alpha * (f - C[labels])`` per row with ``inc_subtensor``. Both add every
row's step from the centers the batch started with: normstats' per-sample rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from .errors import UsageError
from .stats import BATCHNORM, CENTERS


@dataclass(frozen=True)
class Reference:
    """One reference layer family's settings, per kind of statistics.

    Attributes
    ----------
    name : str
        What ``--reference`` and the stats file's ``reference`` metadata call it.
    layers : str
        The layers it stands for, for help text and messages.
    settings : mapping
        Per kind (``'batchnorm'``, ``'centers'``), the state options the layer's
        code fixes.
    """

    name: str
    layers: str
    settings: Mapping[str, Mapping[str, Any]]

    def options(self, kind: str) -> dict[str, Any]:
        """The options this reference sets for `kind` statistics."""
        return dict(self.settings[kind])

    def summary(self, kind: str) -> str:
        """What it sets for `kind`, e.g. 'eps 1e-05, alpha 0.01, ddof 1'."""
        return ", ".join(f"{name} {value}" for name, value in self.settings[kind].items())


def _reference(name: str, layers: str, *, eps: float, alpha: float, ddof: int, center_alpha: float) -> Reference:
    settings = {BATCHNORM: MappingProxyType({"eps": eps, "alpha": alpha, "ddof": ddof}),
                CENTERS: MappingProxyType({"rule": "per-sample", "alpha": center_alpha})}
    return Reference(name, layers, MappingProxyType(settings))


REFERENCES: Mapping[str, Reference] = MappingProxyType({
    reference.name: reference for reference in (
        _reference("pytorch-ext", "Pytorch_Ext BatchNorm / Center", eps=1e-5, alpha=0.01, ddof=1, center_alpha=0.1),
        _reference("pytorch-ext-0.8", "Pytorch_Ext 0.8.x BatchNorm / Center", eps=1e-5, alpha=0.1, ddof=1,
                   center_alpha=0.1),
        _reference("dandelion", "Dandelion BatchNorm / Center", eps=1e-4, alpha=0.1, ddof=0, center_alpha=0.1),
    )
})


def reference(name: str) -> Reference:
    """The reference called `name`.

    Raises
    ------
    UsageError
        An unknown name, listing the known ones.
    """
    found = REFERENCES.get(name)
    if found is None:
        raise UsageError(f"unknown reference {name!r}; known references: {', '.join(REFERENCES)}")
    return found


def with_reference(name: str, kind: str, options: dict[str, Any], given: Iterable[str]) -> dict[str, Any]:
    """`options` with the values reference `name` sets for `kind`, except those in
    `given` (options the user set explicitly win over the reference's)."""
    given = set(given)
    return dict(options, **{key: value for key, value in reference(name).options(kind).items()
                            if key not in given})


def help_text(kind: str) -> str:
    """One line per reference of what it sets for `kind` (for ``--help``)."""
    return "; ".join(f"{ref.name}: {ref.summary(kind)}" for ref in REFERENCES.values())
