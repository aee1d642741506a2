"""Nearest-center assignment: labels and distances of rows to fitted class centers.

:class:`NearestCenters` holds the centers and nothing that changes with the
data, so one object assigns any number of blocks, in any order, and gives
each row the same answer. It never touches files.

How the k nearest centers are found, exactly, at GEMM speed
-----------------------------------------------------------
Every row is screened against every center in float32 with one matrix
product, ``A[i, j] = |c_j|^2 - 2 x_i . c_j`` (euclidean; ``|x_i|^2`` is the
same for the whole row and left out) or ``A[i, j] = -x_i . c_j`` on unit
vectors (cosine). Both rows and centers are first shifted by the mean of the
centers: distances do not change, and float32 then rounds relative to the
spread of the data, not to its offset (features at 1e6 +- 1 stay resolvable).

A screened value is off from the true one by at most
``delta_i = (2 D + 16) u (|x_i|^2 + max_j |c_j|^2)`` (u = 2**-24, D the
feature size: the worst case of any summation order, so BLAS blocking and FMA
are covered; for unit vectors the bracket is 2). Hence with ``a_i`` an upper
bound of the k-th smallest screened value of row i, every center with
``A[i, j] > a_i + 2 delta_i`` is strictly farther than the k nearest and can
be dropped. The few that remain (usually k to k+2) get their distance
recomputed exactly in float64 from the unshifted data, and the k smallest of
those, ties broken by the lowest class index, are the answer. The result is
the float64 brute-force answer, whatever the float32 screening rounded.

The distance matrix is built in tiles of at most SCORE_BYTES (in cache) over
sub-blocks of rows and chunks of centers, so memory is bounded by the block
plus O(K D) whatever K.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from .errors import DataError, RowError, UsageError
from .stats import CENTERS, Stats
from .validate import check_max_distance, check_numeric_dtype
from .workspace import KeepsScratch, Workspace

METRICS = ("euclidean", "cosine")
SCORE_BYTES = 4 << 20  # one float32 tile of rows x centers: a few MB stays in L2/L3
CENTER_CHUNK = 8192  # centers per tile; more rows per tile keep the product BLAS-efficient
ROW_CHUNK = 2048  # rows per tile at most (their float32/float64 copies stay ~2-4 MB)
# float32 screening is safe while no squared norm comes near float32's largest value
FLOAT32_SAFE = 1e36
PIECE_BYTES = 2 << 20  # the differences of part of a wide row to every center, at once


def _rounded_up(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` in `dtype`, never below the float64 values (a threshold must not shrink)."""
    cast = values.astype(dtype)
    return np.where(cast < values, np.nextafter(cast, dtype.type(np.inf)), cast)


def usable_classes(centers: np.ndarray, counts: Optional[np.ndarray]) -> np.ndarray:
    """Indices of the classes that can be assigned: seen (count > 0) and finite.

    A class never seen has no center (exact mode: NaN; ema mode: its initial
    value, random or zero, which no data ever moved), so it is never a
    nearest center.
    """
    flat = np.asarray(centers).reshape(len(centers), -1)
    usable = np.isfinite(flat).all(axis=1)
    if counts is not None:
        usable &= np.asarray(counts) > 0
    return np.flatnonzero(usable)


class NearestCenters(KeepsScratch):
    """The `top_k` nearest class centers of rows, with their distances.

    Parameters
    ----------
    centers : ndarray, shape (K,) + row_shape
        Class centers; rows of any shape are compared flattened. Float64
        centers are used without a copy when every class is usable (K
        centers can be large): do not change them while this object is used.
    counts : ndarray of int, shape (K,), optional
        Rows seen per class; classes with count 0 are never assigned.
        Classes with a non-finite center are never assigned either.
    metric : {'euclidean', 'cosine'}
        ``euclidean``: ``|x - c|``. ``cosine``: ``1 - x.c / (|x| |c|)``, in
        [0, 2]; a zero vector (row or center) has cosine distance 1 to
        everything (it has no direction: neither near nor opposite).
    top_k : int
        Centers returned per row, nearest first.
    max_distance : float, optional
        Entries farther than this get label -1 (open-set rejection); their
        distance is still reported.
    name : str
        What to call the centers in messages (their file).

    Attributes
    ----------
    classes : ndarray of int
        The usable classes, ascending.
    excluded : ndarray of int
        Classes never assigned (count 0 or non-finite center).

    Raises
    ------
    UsageError
        Unknown metric, `top_k` outside [1, usable classes], negative or NaN
        `max_distance`.
    DataError
        No usable class at all.

    Notes
    -----
    Ties (equal float64 distances) go to the lowest class index, also in
    the order of the top k. See the module docstring for how the float32
    screening is made exact.

    Examples
    --------
    >>> import numpy as np
    >>> nearest = NearestCenters(np.array([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]]),
    ...                          np.array([5, 5, 0]))
    >>> labels, distances = nearest(np.array([[0.0, 1.0], [3.0, 3.0]]))
    >>> labels, distances
    (array([0, 1]), array([1., 1.]))
    """

    def __init__(
        self,
        centers: np.ndarray,
        counts: Optional[np.ndarray] = None,
        *,
        metric: str = "euclidean",
        top_k: int = 1,
        max_distance: Optional[float] = None,
        name: str = "the centers",
    ) -> None:
        if metric not in METRICS:
            raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        centers = np.asarray(centers)
        if centers.ndim < 2 or centers.shape[0] == 0:
            raise DataError(f"{name}: centers must have shape (classes, features...), got {centers.shape}")
        check_numeric_dtype(centers.dtype, f"{name}: centers")
        self.metric, self.name = metric, name
        self.num_classes = int(centers.shape[0])
        self.row_shape = tuple(centers.shape[1:])
        self.classes = usable_classes(centers, counts)
        self.excluded = np.setdiff1d(np.arange(self.num_classes), self.classes)
        if self.classes.size == 0:
            raise DataError(
                f"{name} has no usable class: every class has count 0 or a non-finite center; "
                "fit the centers on labelled data first"
            )
        if int(top_k) != top_k or not 1 <= top_k <= self.classes.size:
            unseen = f" ({self.excluded.size} of its {self.num_classes} were never seen)" if self.excluded.size else ""
            raise UsageError(
                f"top-k must be between 1 and the {self.classes.size} usable classes of {name}{unseen}, "
                f"got {top_k}"
            )
        self.top_k = int(top_k)
        self.max_distance = check_max_distance(max_distance)

        flat = centers.reshape(self.num_classes, -1)
        if self.classes.size < self.num_classes:
            flat = flat[self.classes]
        flat = np.asarray(flat, dtype=np.float64)  # no copy of a float64 file's centers
        self.dim = flat.shape[1]
        if metric == "cosine":
            norms = np.sqrt(np.einsum("ij,ij->i", flat, flat))
            self._zero_centers = norms == 0
            flat = flat / np.where(self._zero_centers, 1.0, norms)[:, None]
            self._shift, self._bias, self._center_scale = None, None, 1.0
            weight = -1.0  # A = -x.c on unit vectors: the cosine distance minus 1
        else:
            # the shift only needs to be near the data; the centers' mean is, and costs nothing
            self._shift = flat.mean(axis=0).astype(np.float32)
            self._bias = np.empty(len(flat))  # |c - shift|^2
            weight = -2.0  # A = |c|^2 - 2 x.c: the squared distance minus |x|^2
        self._exact = flat  # float64, unshifted (cosine: unit) centers for the exact distances
        self._weight = weight
        # float32 screening centers, made a few MB at a time: K x D float64 temporaries would
        # triple the memory of K = 100 000 centers
        self._screened32 = np.empty(flat.shape, np.float32)
        piece = max(1, (4 << 20) // (8 * self.dim))
        with np.errstate(over="ignore"):  # centers beyond float32: every tile screens in float64
            for start in range(0, len(flat), piece):
                part = slice(start, start + piece)
                screened = flat[part] if self._shift is None else flat[part] - self._shift
                if self._bias is not None:
                    self._bias[part] = np.einsum("ij,ij->i", screened, screened)
                np.multiply(screened, weight, out=self._screened32[part], casting="same_kind")  # exact
            self._bias32 = None if self._bias is None else self._bias.astype(np.float32)
        if self._bias is not None:
            self._center_scale = float(self._bias.max())
        self._screened64: Optional[np.ndarray] = None  # made when a tile first needs it (rarely)
        self._workspace = Workspace()

    @classmethod
    def from_stats(cls, stats: Stats, **options) -> "NearestCenters":
        """Assign to the centers of a file written by fit-centers (either mode)."""
        stats.require(CENTERS)
        name = options.pop("name", stats.source or "the centers")
        return cls(stats.arrays["centers"], stats.arrays["counts"], name=name, **options)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one row's result: () for top_k 1, else (top_k,)."""
        return () if self.top_k == 1 else (self.top_k,)

    def check(self, row_shape: tuple[int, ...], dtype: np.dtype, name: str = "input") -> None:
        """Raise DataError unless rows of `row_shape` and `dtype` can be assigned."""
        check_numeric_dtype(dtype, name)
        if tuple(row_shape) != self.row_shape:
            raise DataError(
                f"{name} has rows of shape {tuple(row_shape)}, but the centers of {self.name} have "
                f"shape {self.row_shape}; assign features like those the centers were fitted on"
            )

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels and distances of the `top_k` nearest centers of each row of `x`.

        Returns
        -------
        labels : ndarray of int64, shape (rows,) or (rows, top_k)
            Class indices, nearest first; -1 beyond `max_distance`.
        distances : ndarray of float64, same shape
            Euclidean distance or cosine distance, exact to float64 rounding.

        Raises
        ------
        RowError
            A row holds NaN or Inf (its row counted from the first row of `x`),
            or its distances overflow float64.
        """
        x = np.asarray(x)
        self.check(x.shape[1:], x.dtype)
        rows = x.shape[0]
        flat = x.reshape(rows, self.dim)
        labels = np.empty((rows, self.top_k), dtype=np.int64)
        distances = np.empty((rows, self.top_k), dtype=np.float64)
        kc = min(self.classes.size, CENTER_CHUNK)
        step = max(1, min(ROW_CHUNK, SCORE_BYTES // (4 * kc)))
        for start in range(0, rows, step):
            part = slice(start, min(start + step, rows))
            try:
                labels[part], distances[part] = self._nearest(flat[part])
            except RowError as error:
                raise error.shifted(start) from None
        labels, distances = self._finish(labels, distances)
        if self.top_k == 1:
            return labels[:, 0], distances[:, 0]
        return labels, distances

    def _finish(self, nearest: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The labels and distances of (rows, top_k) center indices `nearest` at squared
        (euclidean) or cosine `distances` (made distances in place), farther than
        max_distance labelled -1."""
        if self.metric == "euclidean":
            np.sqrt(distances, out=distances)
        labels = self.classes[nearest]
        if self.max_distance is not None:
            labels[distances > self.max_distance] = -1
        return labels, distances

    def nearest_in_pieces(self, pieces: Iterable[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`__call__` for one row larger than a read block, given as ``(e0, piece)``
        pairs (iterated twice for the cosine metric: the row's norm comes first).

        The float64 distance to every usable center is summed piece by piece from
        differences (no screening: a row this wide costs more to read than to
        compare); memory is a piece and a few MB of differences.

        Raises
        ------
        RowError
            At row 0, as :meth:`__call__`.
        """
        scale = 1.0
        if self.metric == "cosine":
            norm2 = 0.0
            for e0, piece in pieces:
                self._check_piece(e0, piece)
                part = piece.astype(np.float64)
                norm2 += float(np.dot(part, part))
            scale = 1.0 / np.sqrt(norm2) if norm2 > 0 else 0.0
        total = np.zeros(self.classes.size)
        step = max(1, PIECE_BYTES // (8 * self.classes.size))
        with np.errstate(over="ignore", invalid="ignore"):
            for e0, piece in pieces:
                self._check_piece(e0, piece)
                for a in range(0, piece.size, step):
                    part = piece[a:a + step]
                    x = self._workspace.array("x", part.shape, np.float64)
                    np.multiply(part, scale, out=x, casting="unsafe")
                    diff = self._workspace.array("piece diff", (self.classes.size, part.size), np.float64)
                    np.subtract(x, self._exact[:, e0 + a:e0 + a + part.size], out=diff)
                    total += np.einsum("ij,ij->i", diff, diff)
        if not np.isfinite(total).all():
            raise RowError(0, "its distances to the centers overflow float64; rescale the features")
        if self.metric == "cosine":
            total *= 0.5  # |a - b|^2 / 2 = 1 - a.b for unit vectors, without cancellation
            if scale == 0.0:
                total[:] = 1.0
            total[self._zero_centers] = 1.0
        order = np.lexsort((np.arange(total.size), total))[None, :self.top_k]
        labels, distances = self._finish(order, total[order])
        shape = (1,) + self.output_shape  # one row, as __call__ gives a block
        return labels.reshape(shape), distances.reshape(shape)

    def _check_piece(self, e0: int, piece: np.ndarray) -> None:
        """A NaN / Inf value is named as :meth:`_raise_for_row` names it."""
        if piece.dtype.kind == "f" and not np.isfinite(piece).all():
            bad = int(np.flatnonzero(~np.isfinite(piece))[0])
            raise RowError(0, f"column {e0 + bad} holds {piece[bad]}; nearest centers need "
                              "finite features; clean the data first")

    # --- one tile of rows -----------------------------------------------------------

    def _nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in `classes` and exact squared (cosine: plain) distances of
        the top_k nearest centers of the rows `x`, sorted."""
        rows = x.shape[0]
        if self.metric == "cosine":
            exact_rows, zero_rows, screened, scale = self._cosine_rows(x)
        else:
            exact_rows, zero_rows = x, None
            screened, scale = self._euclidean_rows(x)
        if np.all(scale < FLOAT32_SAFE):
            weights, bias, unit = self._screened32, self._bias32, 2.0**-24
        else:  # huge values: float32 would overflow; screen this tile in float64
            screened = x.astype(np.float64) - self._shift
            scale = np.einsum("ij,ij->i", screened, screened) + self._center_scale
            if self._screened64 is None:
                self._screened64 = self._weight * (self._exact - self._shift)
            weights, bias, unit = self._screened64, self._bias, 2.0**-53
        margin = 2 * (2 * self.dim + 16) * unit * scale  # 2 delta: see the module docstring

        bound = np.full(rows, np.inf)  # upper bound of the k-th smallest screened value
        best_pos = np.zeros((rows, 0), dtype=np.int64)
        best_dist = np.zeros((rows, 0))
        total = self.classes.size
        kc = min(total, CENTER_CHUNK)
        # a row holding NaN/Inf makes NaN bounds and no candidates; it is reported below
        with np.errstate(invalid="ignore", over="ignore"):
            for first in range(0, total, kc):
                last = min(first + kc, total)
                scores = self._workspace.array("scores", (rows, last - first), weights.dtype)
                # np.dot, not np.matmul: matmul with out= and a transposed operand skips BLAS (50x slower)
                np.dot(screened, weights[first:last].T, out=scores)
                if bias is not None:
                    scores += bias[first:last]
                np.fmin(bound, self._kth_bound(scores), out=bound)
                limit = _rounded_up(bound + margin, scores.dtype)
                hits = self._workspace.array("hits", scores.shape, bool)
                np.less_equal(scores, limit[:, None], out=hits)
                # flatnonzero + divmod: 15x faster than the 2-D np.nonzero
                hit_rows, hit_cols = np.divmod(np.flatnonzero(hits), last - first)
                hit_cols += first
                dist = self._exact_distances(exact_rows, zero_rows, hit_rows, hit_cols)
                best_pos, best_dist = self._keep_best(best_pos, best_dist, hit_rows, hit_cols, dist)
        bad = np.flatnonzero(~np.isfinite(best_dist[:, -1]))
        if bad.size:
            self._raise_for_row(x, int(bad[0]))
        return best_pos, best_dist

    def _euclidean_rows(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shifted float32 rows for the screening product, and the scale
        ``|x|^2 + max |c|^2`` of its error bound (float64)."""
        screened = self._workspace.array("rows32", x.shape, np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            if x.dtype in (np.float32, np.float16):
                # float32 holds these values exactly: subtract there, rounding relative to the result
                np.subtract(x, self._shift, out=screened, casting="unsafe")
            else:
                # wider values would round relative to their offset if cast first
                wide = self._workspace.array("rows64", x.shape, np.float64)
                np.subtract(x, self._shift, out=wide, casting="unsafe")
                np.copyto(screened, wide, casting="unsafe")
            squared = np.einsum("ij,ij->i", screened, screened).astype(np.float64)
        # the float32 sum of squares may itself be off by D u relative: allow for it
        return screened, squared * (1 + 2 * self.dim * 2.0**-24) + self._center_scale

    def _cosine_rows(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Unit rows in float64 (exact distances) and float32 (screening), which
        rows are zero, and the scale of the error bound (2 for unit vectors)."""
        rows64 = self._workspace.array("rows64", x.shape, np.float64)
        np.copyto(rows64, x, casting="unsafe")
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.sqrt(np.einsum("ij,ij->i", rows64, rows64))
        bad = np.flatnonzero(~np.isfinite(norms))
        if bad.size:
            self._raise_for_row(x, int(bad[0]))
        zero = norms == 0
        rows64 /= np.where(zero, 1.0, norms)[:, None]
        screened = self._workspace.array("rows32", x.shape, np.float32)
        np.copyto(screened, rows64, casting="unsafe")
        return rows64, zero, screened, np.full(x.shape[0], 2.0)

    def _kth_bound(self, scores: np.ndarray) -> np.ndarray:
        """Per row, a value no smaller than the k-th smallest of `scores`.

        k = 1: the minimum. Otherwise the largest of the minima of k disjoint
        column groups: k distinct columns lie at or below it. (A full
        partition costs several times the matrix product.)
        """
        rows, columns = scores.shape
        k = self.top_k
        if k == 1:
            return scores.min(axis=1).astype(np.float64)
        if columns < k:
            return np.full(rows, np.inf)
        width = columns // k
        groups = scores[:, : k * width].reshape(rows, k, width)
        return groups.min(axis=2).max(axis=1).astype(np.float64)

    def _exact_distances(self, rows: np.ndarray, zero_rows: Optional[np.ndarray], hit_rows: np.ndarray,
                         hit_cols: np.ndarray) -> np.ndarray:
        """Squared euclidean (cosine: cosine) distances of the candidate pairs,
        in float64 from differences (no cancellation), a few MB at a time."""
        out = np.empty(hit_rows.size)
        piece = max(1, (2 << 20) // (8 * self.dim))
        one_each = hit_rows.size == rows.shape[0] and np.array_equal(hit_rows, np.arange(rows.shape[0]))
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, hit_rows.size, piece):
                stop = min(start + piece, hit_rows.size)
                # gathered into reused buffers: fresh pages cost more than this arithmetic
                diff = self._workspace.array("diff", (stop - start, self.dim), np.float64)
                np.take(self._exact, hit_cols[start:stop], axis=0, out=diff)
                if one_each:  # the usual case: one candidate per row, in row order
                    picked = rows[start:stop]
                else:
                    picked = self._workspace.array("picked", (stop - start, self.dim), rows.dtype)
                    np.take(rows, hit_rows[start:stop], axis=0, out=picked)
                np.subtract(picked, diff, out=diff)
                out[start:stop] = np.einsum("ij,ij->i", diff, diff)
        if zero_rows is not None:
            out *= 0.5  # |a - b|^2 / 2 = 1 - a.b for unit vectors, without cancellation
            out[zero_rows[hit_rows] | self._zero_centers[hit_cols]] = 1.0
        return out

    def _keep_best(self, pos: np.ndarray, dist: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                   new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Merge candidates into each row's k best so far: by distance, then class."""
        n, kept = pos.shape
        all_rows = np.concatenate([np.repeat(np.arange(n), kept), rows])
        all_cols = np.concatenate([pos.ravel(), cols])
        all_dist = np.concatenate([dist.ravel(), new])
        order = np.lexsort((all_cols, all_dist, all_rows))
        all_rows, all_cols, all_dist = all_rows[order], all_cols[order], all_dist[order]
        starts = np.searchsorted(all_rows, np.arange(n))
        rank = np.arange(all_rows.size) - starts[all_rows]
        take = rank < self.top_k
        width = min(self.top_k, int(np.bincount(all_rows, minlength=n).min()) if n else 0)
        if width < self.top_k:  # some row lacks candidates so far (a NaN row, or the first chunks)
            width = self.top_k
            out_pos = np.zeros((n, width), dtype=np.int64)
            out_dist = np.full((n, width), np.nan)
            out_pos[all_rows[take], rank[take]] = all_cols[take]
            out_dist[all_rows[take], rank[take]] = all_dist[take]
            missing = np.isnan(out_dist)
            out_dist[missing] = np.inf  # filled by later chunks, or reported as a bad row
            return out_pos, out_dist
        return all_cols[take].reshape(n, width), all_dist[take].reshape(n, width)

    def _raise_for_row(self, x: np.ndarray, row: int) -> None:
        """Say what is wrong with row `row` of `x` (its distances are not finite)."""
        try:
            self._check_piece(0, x[row].reshape(-1))
        except RowError as error:
            raise error.shifted(row) from None
        raise RowError(row, "its distances to the centers overflow float64; rescale the features")
