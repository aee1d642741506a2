"""A row taken in pieces gives the sums of the whole row (normstats.row_pieces)."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from normstats.errors import NonFiniteError
from normstats.kernels import Layout, accumulate
from normstats.row_pieces import accumulate_row, piece_ranges, row_pieces


@pytest.mark.parametrize("row_shape, itemsize, block", [
    ((1000,), 4, 400), ((1000,), 8, 1 << 20), ((7, 11, 13), 4, 100), ((7, 11, 13), 4, 13 * 4 * 3),
    ((7, 11, 13), 8, 8), ((3, 4, 5), 4, 4 * 20 * 2), ((2, 3, 1, 5), 2, 6), ((0, 4), 4, 8), ((5,), 8, 3)])
def test_pieces_cover_the_row_once_as_hyperslabs_within_the_block(row_shape, itemsize, block) -> None:
    ranges = piece_ranges(row_shape, itemsize, block)
    elements = int(np.prod(row_shape))
    assert [e for e0, e1 in ranges for e in range(e0, e1)] == list(range(elements))
    for e0, e1 in ranges:
        assert (e1 - e0) * itemsize <= block or e1 - e0 == 1
        first, last = np.unravel_index(e0, row_shape), np.unravel_index(e1 - 1, row_shape)
        # one axis varies; before it the indices are fixed, after it the sub-array is whole
        axis = next((a for a in range(len(row_shape)) if first[a] != last[a]), len(row_shape) - 1)
        assert all(first[a] == 0 and last[a] == row_shape[a] - 1 for a in range(axis + 1, len(row_shape)))
        index = tuple(slice(i, i + 1) for i in first[:axis]) + (slice(first[axis], last[axis] + 1),)
        block_of = np.arange(elements).reshape(row_shape)[index]
        assert block_of.ravel().tolist() == list(range(e0, e1))


def _pieces(row: np.ndarray, block_bytes: int):
    flat = row.reshape(-1)
    for e0, e1 in piece_ranges(row.shape, row.itemsize, block_bytes):
        yield e0, flat[e0:e1]


CASES = [  # row shape, axes, dtype
    ((300,), (0,), np.float32), ((6, 7, 9), (0, 2, 3), np.float32), ((6, 7, 9), (0, 1), np.float64),
    ((6, 7, 9), (0, 1, 3), np.int64), ((5, 4, 3, 2), (0, 2, 4), np.float16), ((6, 7, 9), (0, 3), np.uint8)]


@pytest.mark.parametrize("row_shape, axes, dtype", CASES)
@pytest.mark.parametrize("block_bytes", [1, 24, 100, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_a_row_in_pieces_equals_the_whole_row(row_shape, axes, dtype, block_bytes, weighted) -> None:
    rng = np.random.default_rng(len(row_shape) + block_bytes)
    values = rng.normal(size=row_shape) * 3 + 1e3
    row = (values if np.dtype(dtype).kind == "f" else np.abs(values)).astype(dtype)
    layout = Layout.of(row_shape, axes)
    keys, fresh = np.zeros(2, np.int64), np.ones(2, bool)
    weight = 2.5 if weighted else None
    whole = accumulate(row[None], layout, np.array([1]), keys, None, fresh,
                       weights=None if weight is None else np.array([weight]))
    cut = accumulate_row(_pieces(row, block_bytes), layout, 1, keys, None, fresh, weight=weight)
    assert cut.rows.tolist() == whole.rows.tolist() == [0, 1]
    assert cut.weight.tolist() == whole.weight.tolist()
    # The shifts may differ (a whole channels-last row takes each channel's shift from
    # its first pixel, a piece from its own elements); the moments may not.
    per_stat = layout.per_stat
    np.testing.assert_allclose(cut.means(per_stat), whole.means(per_stat), rtol=1e-12)
    np.testing.assert_allclose(cut.m2(per_stat), whole.m2(per_stat), rtol=1e-9, atol=1e-9)
    # and the numbers themselves, against plain NumPy in float64
    reduced = tuple(a - 1 for a in axes if a > 0)
    expected_mean = row.astype(np.float64).mean(axis=reduced).reshape(-1) if reduced else row.astype(np.float64).ravel()
    np.testing.assert_allclose(cut.means(layout.per_stat)[1], expected_mean, rtol=1e-12)
    if reduced:
        expected_m2 = row.astype(np.float64).var(axis=reduced).reshape(-1) * layout.per_stat * (weight or 1.0)
        np.testing.assert_allclose(cut.m2(layout.per_stat)[1], expected_m2, rtol=1e-9)


def test_omitted_values_are_counted_per_element_in_pieces() -> None:
    row = np.random.default_rng(3).normal(size=(4, 50)).astype(np.float32) + 7
    row[1, 3] = np.nan
    row[2, 40:45] = np.inf
    layout = Layout.of(row.shape, (0, 2))
    keys, fresh = np.zeros(1, np.int64), np.ones(1, bool)
    whole = accumulate(row[None], layout, np.zeros(1, np.int64), keys, None, fresh, omit=True)
    cut = accumulate_row(_pieces(row, 40), layout, 0, keys, None, fresh, omit=True)
    np.testing.assert_array_equal(cut.count, whole.count)
    assert cut.count[0].tolist() == [50, 49, 45, 50]
    np.testing.assert_allclose(cut.s1, whole.s1, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(cut.s2, whole.s2, rtol=1e-12)


def test_a_nan_in_a_later_piece_names_its_place_in_the_row() -> None:
    row = np.ones((3, 40), np.float32)
    row[2, 17] = np.nan
    with pytest.raises(NonFiniteError) as raised:
        accumulate_row(_pieces(row, 32), Layout.of(row.shape, (0, 2)), 0, np.zeros(1, np.int64), None,
                       np.ones(1, bool))
    assert raised.value.index == (2, 17) and raised.value.row == 0


def test_a_64_mb_row_read_in_1_mb_pieces_stays_within_the_piece(tmp_path: Path) -> None:
    row_shape = (16, 1 << 20)  # one float32 row of 64 MB
    path = tmp_path / "wide.npy"
    wide = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(2, *row_shape))
    rng = np.random.default_rng(9)
    for c in range(row_shape[0]):
        wide[1, c] = rng.standard_normal(row_shape[1], dtype=np.float32) * (c + 1) + 100 * c
    wide.flush()
    offset = wide.offset
    del wide
    layout = Layout.of(row_shape, (0, 2))  # one statistic per channel
    block = 1 << 20
    row_bytes = 4 * int(np.prod(row_shape))
    fd = os.open(path, os.O_RDONLY)
    try:
        def read(e0: int, e1: int, out: np.ndarray) -> None:
            assert os.preadv(fd, [memoryview(out).cast("B")], offset + row_bytes + 4 * e0) == out.nbytes

        keys, fresh = np.zeros(1, np.int64), np.ones(1, bool)
        small = np.ones((16, 4), np.float32)  # the kernel loaded (or compiled) before memory is traced
        accumulate_row(_pieces(small, 32), Layout.of(small.shape, (0, 2)), 0, keys, None, fresh)
        tracemalloc.start()
        try:
            ranges = piece_ranges(row_shape, 4, block)
            cut = accumulate_row(row_pieces(read, ranges, np.dtype(np.float32)), layout, 0, keys, None, fresh)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        os.close(fd)
    assert len(ranges) == 64 and peak < 3 * block, peak
    whole_row = np.asarray(np.load(path, mmap_mode="r")[1])
    whole = accumulate(whole_row[None], layout, np.zeros(1, np.int64), keys, None, fresh)
    # Against long double: the pieces are as close as the whole row (2**20 terms in one
    # sequential sum err by up to ~1e-10 of it; each piece sums fewer).
    exact = whole_row.astype(np.longdouble)
    mean = exact.mean(axis=1)
    m2 = ((exact - mean[:, None]) ** 2).sum(axis=1)
    for sums in (cut, whole):
        np.testing.assert_allclose(sums.means(layout.per_stat)[0], mean.astype(np.float64), rtol=1e-12)
        np.testing.assert_allclose(sums.m2(layout.per_stat)[0], m2.astype(np.float64), rtol=1e-10)
    cut_error = np.abs(cut.m2(layout.per_stat)[0] - m2) / m2
    whole_error = np.abs(whole.m2(layout.per_stat)[0] - m2) / m2
    assert cut_error.max() <= 2 * whole_error.max() + 1e-13, (cut_error.max(), whole_error.max())
