"""apply's output is flushed while it is written (normstats.flush_ahead): a flush per
FLUSH_BYTES written, the same file as without, no thread left, on success or error."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import normstats as ns
from normstats import flush_ahead
from tests.reference import make_data


def _flushers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "normstats-flush"]


def test_a_flush_every_so_many_bytes_then_the_thread_ends(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10)
    flushed = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (flushed.append(fd), real(fd)))
    import time

    with flush_ahead.flush_ahead(str(path), every=100) as flusher:
        for step in range(1, 8):
            flusher.written(40)  # 280 bytes: two flushes asked for (at 120 and 240)
            deadline = time.monotonic() + 30
            while len(flushed) < (step * 40) // 120 and time.monotonic() < deadline:
                time.sleep(0.001)  # (the thread takes each request before the next)
    assert len(flushed) == 2
    assert not _flushers()


def test_no_path_is_a_no_op():
    with flush_ahead.flush_ahead(None) as flusher:
        flusher.written(1 << 40)
    assert not _flushers()


def _input_and_stats(tmp_path, x: np.ndarray):
    """`x` saved as x.npy, and its exact statistics."""
    source = tmp_path / "x.npy"
    np.save(source, x)
    with ns.open_stream([str(source)]) as stream:
        return source, ns.run_fit(ns.batchnorm_state("exact"), stream)


def test_apply_with_early_flushes_writes_the_same_rows(tmp_path, monkeypatch):
    x = make_data((5000, 8), "float32", seed=1)
    source, stats = _input_and_stats(tmp_path, x)
    flushed = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (flushed.append(fd), real(fd)))
    outputs = {}
    for every in (8 * 1024, 1 << 40):
        monkeypatch.setattr(flush_ahead, "FLUSH_BYTES", every)
        out = tmp_path / f"y{every}.npy"
        with ns.open_stream([str(source)]) as stream:
            ns.apply_stats(ns.Normalizer(stats), stream, str(out), block_rows=300)
        outputs[every] = np.load(out)
    assert flushed  # the small threshold flushed while writing
    np.testing.assert_array_equal(outputs[8 * 1024], outputs[1 << 40])
    mean, var = x.astype(np.float64).mean(0), x.astype(np.float64).var(0, ddof=1)
    np.testing.assert_allclose(outputs[8 * 1024], (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    assert not _flushers()


def test_apply_failing_midway_leaves_no_output_and_no_thread(tmp_path, monkeypatch):
    source, stats = _input_and_stats(tmp_path, make_data((3000, 4), "float64", seed=2))
    monkeypatch.setattr(flush_ahead, "FLUSH_BYTES", 1024)
    out = tmp_path / "y.npy"
    calls = []

    def cut(rows):
        calls.append(rows)
        if len(calls) == 2:
            os.truncate(source, source.stat().st_size // 2)

    with ns.open_stream([str(source)]) as stream, pytest.raises(ns.DataError, match=r"x\.npy"):
        ns.apply_stats(ns.Normalizer(stats), stream, str(out), block_rows=200, progress=cut)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name not in ("x.npy",)]
    assert not _flushers()
