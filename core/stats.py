"""The result of a fit: named arrays plus metadata, as stored in a stats file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .errors import StatsFileError

BATCHNORM = "batchnorm"
CENTERS = "centers"


@dataclass
class Stats:
    """Fitted statistics.

    Attributes
    ----------
    kind : {'batchnorm', 'centers'}
        Which estimator produced them.
    arrays : dict of str to ndarray
        ``mean`` / ``inv_std`` (absent when disabled) for BatchNorm,
        ``centers`` / ``counts`` for centers; exact mode adds ``var`` and
        ``count`` (BatchNorm) so that files stay mergeable.
    meta : dict
        JSON-serializable options and provenance (mode, axes, alpha, eps,
        ddof, batch size, rows and batches seen, input shape and dtype, ...).
    """

    kind: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None  # the file it was read from, for messages

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    def require(self, kind: str, source: Optional[str] = None) -> "Stats":
        """Return self if it holds `kind` statistics, else raise StatsFileError."""
        if self.kind != kind:
            name = source or self.source or "the stats file"
            raise StatsFileError(
                f"{name} holds {self.kind} statistics, not {kind}; give a file written by "
                f"{'fit-bn' if kind == BATCHNORM else 'fit-centers'}"
            )
        return self
