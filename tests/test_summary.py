"""Summary lines: the whole command's time, this run's rows, counts with separators."""

from __future__ import annotations

import re
import time

import numpy as np

import normstats as ns
import normstats.stream
from normstats.cli import report
from normstats.stats import Stats


def _seconds(line: str) -> float:
    return float(re.search(r"([\d.]+) s, ", line).group(1))


def test_the_time_shown_includes_opening_the_inputs(run, tmp_path, monkeypatch) -> None:
    np.save(tmp_path / "x.npy", np.ones((10, 2), np.float32))
    opening = normstats.stream.open_stream

    def slow_open(*args, **kwargs):
        time.sleep(0.3)
        return opening(*args, **kwargs)

    monkeypatch.setattr(ns, "open_stream", slow_open)
    result = run("fit-bn", "x.npy", "-o", "s.npz", "--mode", "exact")
    assert result.exit_code == 0, result.stderr
    assert _seconds(result.stdout) >= 0.3


def test_rows_per_second_count_only_this_runs_rows(monkeypatch, capsys) -> None:
    """After --resume, rows_seen includes the checkpoint's rows; the rate must not."""
    meta = {"mode": "exact", "rows_seen": 1_000_000, "rows_read": 1_000, "bytes_read": 8_000,
            "num_classes": 20_000, "classes_unseen": 1_234}
    stats = Stats("centers", {"centers": np.zeros((20_000, 2)), "counts": np.zeros(20_000)}, meta)
    monkeypatch.setattr(report, "command_seconds", lambda: 2.0)
    report.summarize_fit("fit-centers", stats, "c.npz")
    line = capsys.readouterr().out
    assert "1,000,000 rows" in line and "500 rows/s" in line
    assert "20,000 classes (1,234 unseen)" in line


def test_a_fit_records_the_rows_it_read(tmp_path) -> None:
    np.save(tmp_path / "x.npy", np.arange(20, dtype=np.float32).reshape(10, 2))
    with ns.open_stream([str(tmp_path / "x.npy")]) as stream:
        stats = ns.run_fit(ns.BatchNormExact(), stream, start_row=4)
    assert stats.meta["rows_read"] == 6 and stats.meta["bytes_read"] == 6 * 8
