"""Guarantees under stress: killed processes, corrupted files, untrusted links,
concurrent runs, and numerically hazardous streams."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns
from tests.processes import bytes_read, has_proc, wait_until_normstats_runs, wait_until_read

SCRIPT = str(Path(sys.executable).with_name("normstats"))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- killed at random moments ------------------------------------------------


@pytest.fixture(scope="module")
def big_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Large enough that a fit takes a good fraction of a second."""
    path = tmp_path_factory.mktemp("big") / "x.npy"
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1_500_000, 32))
    rows[:] = np.random.default_rng(0).standard_normal(rows.shape, dtype=np.float32)
    rows.flush()
    del rows
    return path


@pytest.mark.skipif(not has_proc(), reason="needs Linux /proc to time the kills by the run's progress")
def test_random_kills_leave_no_file_or_the_previous_one(big_input: Path, tmp_path: Path) -> None:
    rng = random.Random(5)
    previous = tmp_path / "previous.npz"
    subprocess.run([SCRIPT, "fit-bn", str(big_input), "-o", str(previous), "-q", "--mode", "exact", "--force"],
                   check=True, capture_output=True)
    old = previous.read_bytes()
    size = big_input.stat().st_size
    codes = []
    for trial in range(8):
        sig = signal.SIGINT if trial % 2 else signal.SIGTERM
        overwrite = trial % 4 < 2
        out = previous if overwrite else tmp_path / f"new{trial}.npz"
        command = [SCRIPT, "fit-bn", str(big_input), "-o", str(out), "--mode", "exact", "-q", "--force"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Mostly mid-fit, sometimes at start-up: timed by what the run has done (its code
        # started; a share of the input read), which the machine's load does not shift.
        wait_until_normstats_runs(process)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.0, 0.15))
        else:
            wait_until_read(process, bytes_read(process.pid) + int(size * rng.uniform(0.05, 0.8)))
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
        codes.append(process.returncode)
        assert _leftovers(tmp_path) == [], f"temporary files left after {sig!r}"
        if process.returncode == 130:
            assert stderr.strip().splitlines()[-1] == "Error: interrupted; no partial output was written"
            assert "Traceback" not in stderr
        # The output is absent, the previous file, or complete (the signal came after the
        # rename): never partial.
        if out.exists() and not (overwrite and out.read_bytes() == old):
            assert ns.read_stats(str(out)).meta["rows_seen"] == 1_500_000
            assert process.returncode in (0, 130, -signal.SIGINT, -signal.SIGTERM)  # signal at exit
            old = out.read_bytes() if overwrite else old
        elif process.returncode == 0:
            pytest.fail("a run that exited 0 left no new output")
    assert 130 in codes  # the kills did land mid-run


# --- corrupted inputs -----------------------------------------------------------

FUZZ_CHILD = textwrap.dedent(
    """
    import json, os, random, sys
    import normstats as ns
    folder, cases = sys.argv[1], int(sys.argv[2])
    rng = random.Random(11)
    originals = {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}
    outcomes = {"ok": 0, "error": 0}
    for case in range(cases):
        name, data = rng.choice(sorted(originals.items()))
        data = bytearray(data)
        how = rng.choice(["truncate", "flip", "header"])
        if how == "truncate":
            data = data[: rng.randrange(len(data))]
        elif how == "flip":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            start = rng.randrange(min(len(data), 256))
            data[start:start + 8] = bytes(rng.randrange(256) for _ in range(8))
        path = os.path.join(folder, "fuzzed" + os.path.splitext(name)[1])
        with open(path, "wb") as f:
            f.write(data)
        try:
            if name.startswith("stats"):
                ns.Normalizer(ns.read_stats(path))
            else:
                with ns.open_stream([path + (":x" if name.endswith(".h5") else "")]) as stream:
                    state = ns.BatchNormExact()
                    ns.run_fit(state, stream, block_rows=7)
            outcomes["ok"] += 1
        except ns.NormstatsError:
            outcomes["error"] += 1
    print(json.dumps(outcomes))
    """
)


def test_corrupted_files_give_normstats_errors_only(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((60, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("x", data=x)
    with h5py.File(tmp_path / "chunked.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(8, 5), compression="gzip", shuffle=True)
    stats = ns.BatchNormExact().update(x).result()
    for suffix in (".npz", ".h5", ".safetensors", ".json"):
        ns.write_stats(stats, str(tmp_path / f"stats{suffix}"))
    # A child process: a crash in a C library must fail the test, not end the session.
    result = subprocess.run([sys.executable, "-c", FUZZ_CHILD, str(tmp_path), "400"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout)
    assert outcomes["ok"] + outcomes["error"] == 400
    assert outcomes["error"] > 130  # most corruptions are detected, not silently read


# --- trust boundaries ------------------------------------------------------------


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    """in/ holds files whose data lives in out/ (outside) or in/ (inside)."""
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    data = np.arange(12.0).reshape(6, 2)
    with h5py.File(outside / "secret.h5", "w") as f:
        f["x"] = data
    with h5py.File(inside / "local.h5", "w") as f:
        f["x"] = data
    with h5py.File(inside / "link.h5", "w") as f:
        f["x"] = h5py.ExternalLink("../out/secret.h5", "/x")
    with h5py.File(inside / "locallink.h5", "w") as f:
        f["x"] = h5py.ExternalLink("local.h5", "/x")
    layout = h5py.VirtualLayout(shape=(6, 2), dtype="f8")
    layout[:] = h5py.VirtualSource("../out/secret.h5", "x", shape=(6, 2))
    with h5py.File(inside / "vds.h5", "w") as f:
        f.create_virtual_dataset("x", layout)
    (outside / "raw.bin").write_bytes(data.tobytes())
    with h5py.File(inside / "extstore.h5", "w") as f:
        f.create_dataset("x", shape=(6, 2), dtype="f8", external=[("../out/raw.bin", 0, data.nbytes)])
    return inside


@pytest.mark.parametrize("name, kind", [("link", "external link"), ("vds", "virtual dataset"),
                                        ("extstore", "external storage")])
def test_data_from_outside_the_folder_is_refused(run, linked: Path, name: str, kind: str) -> None:
    out = linked / "s.npz"
    result = run("fit-bn", f"{linked / name}.h5:x", "-o", out)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {linked / name}.h5:x reads ") and kind in result.stderr
    assert "--allow-external" in result.stderr and not out.exists()
    allowed = run("fit-bn", f"{linked / name}.h5:x", "-o", out, "--allow-external", "--mode", "exact")
    assert allowed.exit_code == 0
    np.testing.assert_allclose(np.load(out)["mean"], [5.0, 6.0])


def test_links_within_the_folder_are_read(run, linked: Path) -> None:
    result = run("fit-bn", f"{linked / 'locallink.h5'}:x", "-o", linked / "s.npz", "--mode", "exact")
    assert result.exit_code == 0, result.stderr


# --- many processes at once -----------------------------------------------------


def test_twenty_concurrent_runs_agree(tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((5000, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    before = (tmp_path / "x.npy").read_bytes()

    def command(i: int, name: str = "s") -> list[str]:
        return [SCRIPT, "fit-bn", str(tmp_path / "x.npy"), "-o", str(tmp_path / f"{name}{i}.npz"),
                "--mode", "exact" if i % 2 else "ema", "-q"]

    # One run of each mode first: on a fresh kernel cache twenty processes would otherwise all
    # compile at once (minutes on two cores); the runs below then start from the cache.
    for i in (0, 1):
        subprocess.run(command(i, "first"), check=True, capture_output=True, timeout=300)
    processes = [subprocess.Popen(command(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(20)]
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr
    finally:
        for process in processes:  # none left running (nor its pipes open) after a failure
            if process.poll() is None:
                process.kill()
                process.communicate()
    for parity in (0, 1):
        results = [np.load(tmp_path / f"s{i}.npz") for i in range(parity, 20, 2)]
        for other in results[1:]:
            for key in ("mean", "inv_std"):
                assert np.array_equal(results[0][key], other[key])
    assert (tmp_path / "x.npy").read_bytes() == before


# --- numerical hazards -------------------------------------------------------------


def test_hundred_million_identical_values_do_not_drift() -> None:
    value = np.float32(0.1)  # not representable in binary: rounding would show
    block = np.full((1_000_000, 1), value, dtype=np.float32)
    exact, ema = ns.BatchNormExact(), ns.BatchNormEMA(batch_size=256)
    for _ in range(100):
        exact.update(block)
        ema.update(block)
    stats = exact.result()
    assert stats.arrays["count"][0] == 1e8
    assert stats.arrays["mean"][0] == np.float64(value)
    assert stats.arrays["var"][0] == 0.0
    assert stats.arrays["inv_std"][0] == 1 / np.sqrt(1e-5)
    assert stats.meta["near_constant"] == [0]
    running = ema.result().arrays
    assert running["mean"][0] == pytest.approx(float(value), rel=1e-12)
    assert running["inv_std"][0] == pytest.approx(1 / np.sqrt(1e-5), rel=1e-12)


def test_float16_values_near_the_top_of_the_range_do_not_overflow() -> None:
    x = np.full((4096, 3), 60000, dtype=np.float16)
    x[::2] = 65000
    stats = ns.BatchNormExact(ddof=0).update(x).result().arrays
    expected = x.astype(np.float64)
    np.testing.assert_allclose(stats["mean"], expected.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(stats["var"], expected.var(axis=0), rtol=1e-12)
    assert np.isfinite(ns.BatchNormEMA(batch_size=64).update(x).result().arrays["inv_std"]).all()


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int64])
def test_integer_input_is_promoted_without_wrapping(dtype) -> None:
    info = np.iinfo(dtype)
    x = np.array([[info.max], [info.max], [info.min], [info.max]], dtype=dtype)
    stats = ns.BatchNormExact(ddof=0).update(x).result().arrays
    expected = x.astype(np.float64)
    np.testing.assert_allclose(stats["mean"], expected.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(stats["var"], expected.var(axis=0), rtol=1e-12)
