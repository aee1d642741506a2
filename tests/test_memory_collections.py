"""Memory of a fit over a sequence collection of many utterances: bounded by the read
block and the per-utterance index, not by the data (issue 13: 100 000 utterances, 4 GB in
bench/run.py's fit-bn-exact-collection; here 10 000 utterances, 128 MB, in seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

kaldiio = pytest.importorskip("kaldiio")
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (VmHWM)")

UTTERANCES, FRAMES, DIM = 10_000, 100, 32  # 128 MB of float32 frames

CHILD = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path
    import numpy as np
    import kaldiio, normstats as ns, normstats.kernels

    def memory(field):
        status = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{field}:\\s+(\\d+) kB", status, re.M).group(1)) * 1024

    normstats.kernels.warm_up(np.dtype(np.float32))
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    base = memory("VmRSS")
    with ns.open_stream([sys.argv[1]]) as stream:
        stats = ns.run_fit(ns.batchnorm_state("exact", axes="auto"), stream)
    print(json.dumps({"growth": memory("VmHWM") - base, "mean": stats.arrays["mean"].tolist(),
                      "rows": stream.rows}))
    """
)


def test_a_fit_over_many_utterances_stays_bounded(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pattern = rng.normal(size=(FRAMES, DIM)).astype(np.float32)
    with kaldiio.WriteHelper(f"ark,scp:{tmp_path / 'c.ark'},{tmp_path / 'c.scp'}") as writer:
        for number in range(UTTERANCES):
            writer(f"u{number:06d}", pattern + np.float32(number % 7))
    data_bytes = UTTERANCES * FRAMES * DIM * 4
    child = subprocess.run([sys.executable, "-c", CHILD, f"scp:{tmp_path / 'c.scp'}"], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    found = json.loads(child.stdout.splitlines()[-1])
    assert found["rows"] == UTTERANCES * FRAMES
    counts = np.bincount(np.arange(UTTERANCES) % 7)
    expected = sum(n * (pattern + np.float32(k)).astype(np.float64).mean(0) for k, n in enumerate(counts))
    np.testing.assert_allclose(found["mean"], expected / UTTERANCES, rtol=1e-9)
    # the read blocks (two 8 MB buffers and the work on one) and the index of 10 000 entries;
    # a fit that held the data would need 128 MB more
    assert found["growth"] < 0.5 * data_bytes, f"peak grew by {found['growth'] / 2**20:.0f} MB"


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_an_hdf5_collection_output_keeps_no_object_per_sequence(tmp_path: Path, compression) -> None:
    # A name, a shape and a row region per sequence took ~750 B each (75 MB for 100 000
    # utterances); offsets and lengths in arrays, and the open dataset only, take far less.
    import tracemalloc

    from normstats.writers.collections import collection_output

    count = 2_000
    keys = [f"utt{i:06d}" for i in range(count)]
    tracemalloc.start()
    try:
        with collection_output(f"{tmp_path / 'out.h5'}:/").writer(keys, np.ones(count, np.int64), (2,), np.float32,
                                                                   compression=compression) as writer:
            for i in range(count):
                writer.write(i, 0, np.full((1, 2), i, np.float32))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / count < 300, peak / count
    import h5py

    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert len(f) == count and f["utt001234"][0, 1] == 1234
