"""apply for rows larger than a read block: each row normalized piece by piece.

A piece (:func:`normstats.row_pieces.piece_ranges`) is a hyperslab of the
row, so the statistics' terms, broadcast over the row, are a view of the same
slice: the formula is :class:`~normstats.normalize.Normalizer`'s, in the same
precision and order of operations, and the output element for element that of
the whole row. Memory is a piece, its result and the normalizer's terms.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import RowError
from .normalize import Normalizer
from .row_pieces import piece_shape, piece_slices


class PieceNormalizer:
    """Normalize the pieces of rows of `normalizer`'s shape, one at a time."""

    def __init__(self, normalizer: Normalizer) -> None:
        self.normalizer = normalizer
        # The terms of the last row's group: every piece of a row slices the same ones (with
        # per-group statistics, selecting them copies a row's worth: once per row, not per piece).
        self._row_terms: Optional[tuple[tuple, dict]] = None

    def __call__(self, piece: np.ndarray, e0: int, group: Optional[np.ndarray] = None) -> np.ndarray:
        """The normalized elements ``e0:e0+piece.size`` of one row (1-D, a reused buffer).

        Raises
        ------
        RowError
            At row 0: a finite value gave NaN or infinity (as :class:`Normalizer`).
        """
        normalizer = self.normalizer
        row_shape = normalizer.row_shape
        e1 = e0 + piece.size
        index = (slice(None),) + piece_slices(row_shape, e0, e1)
        x = piece.reshape((1,) + piece_shape(row_shape, e0, e1))
        target = normalizer.result_dtype(piece.dtype)
        compute = np.promote_types(target, np.float32)  # float16 is computed in float32
        terms = self._terms(compute, index, group)
        y = normalizer._formula(x, terms, compute, "piece")
        out = normalizer._in_dtype(y, target)
        limit = np.finfo(target).max
        if y.size and not (y.max() <= limit and y.min() >= -limit):
            self._check_finite(x, e0, out, index, group)
        return out.reshape(-1)

    def _terms(self, compute: np.dtype, index: tuple, group: Optional[np.ndarray]) -> dict:
        """The terms over the piece at `index` of a row: views, no copies of the row's size."""
        normalizer = self.normalizer
        key = (compute, None if group is None else int(np.asarray(group).reshape(-1)[0]))
        if self._row_terms is None or self._row_terms[0] != key:
            terms = normalizer._terms_in(compute)
            if normalizer.num_groups is not None:
                terms = normalizer._per_row(terms, group, 1)
            self._row_terms = (key, terms)
        terms = self._row_terms[1]
        full = (1,) + normalizer.row_shape
        return {k: None if v is None else np.broadcast_to(v, full)[index] for k, v in terms.items()}

    def _check_finite(self, x: np.ndarray, e0: int, out: np.ndarray, index: tuple,
                      group: Optional[np.ndarray]) -> None:
        made = ~np.isfinite(out)
        if x.dtype.kind == "f":
            made &= np.isfinite(x)
        if not made.any():
            return  # NaN / Inf in, NaN / Inf out
        at = int(np.flatnonzero(made.reshape(-1))[0])
        element = [int(i) for i in np.unravel_index(e0 + at, self.normalizer.row_shape)]
        terms = self._terms(np.dtype(np.float64), index, group)
        one = x.reshape(-1)[at:at + 1].reshape((1,) * x.ndim)
        parts = {k: None if v is None else v.reshape(-1)[at:at + 1].reshape(one.shape) for k, v in terms.items()}
        exact = self.normalizer._formula(one, parts, np.dtype(np.float64), "exact").reshape(-1)[0]
        raise RowError(0, self.normalizer._problem(element, one.reshape(-1)[0], exact, out.dtype, group))
