"""Fixtures for the command-line tests: a click runner, a `run` helper and small data files."""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result

from normstats.cli import cli

# Keras reads its backend once, at its first import (by test_interop or a README block): use
# torch where it is installed, the backend the export checks are run with.
if importlib.util.find_spec("torch") is not None:
    os.environ.setdefault("KERAS_BACKEND", "torch")


# --- pytest-xdist: which tests must share a worker ----------------------------------

# Modules whose tests share one worker process: README's examples build on each other's
# files in order; the SeaweedFS server and the Dask cluster are started once per module.
# (xdist's own `xdist_group` mark does not group on pytest >= 9.2: pytest-xdist#1386.)
ONE_WORKER_MODULES = frozenset({"tests/test_docs.py", "tests/test_remote.py", "tests/test_dask.py"})


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown (and unused) without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``--dist load`` (the default of ``-n``): every test on its own, except the
    modules of :data:`ONE_WORKER_MODULES`, each sent whole to one worker, in order."""
    if config.getvalue("dist") != "load":
        return None  # an explicit --dist keeps xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling

    class SharedModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return SharedModules(config, log)


@pytest.fixture
def runner() -> CliRunner:
    """A CliRunner whose result keeps stdout and stderr apart.

    click >= 8.2 always separates them (``mix_stderr`` was removed; ``result.output``
    is the interleaved view); click 8.1 needs ``mix_stderr=False`` for that.
    """
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:  # click < 8.2
        return CliRunner(mix_stderr=False)
    return CliRunner()


@pytest.fixture
def run(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """``run(*args)`` invokes ``normstats`` in `tmp_path` and returns the click Result.

    Arguments are converted with ``str`` so that paths can be passed as they are.
    Exceptions are caught as the real script would (``result.exception``).
    """
    monkeypatch.chdir(tmp_path)

    def _run(*args: object, **kwargs) -> Result:
        return runner.invoke(cli, [str(arg) for arg in args], **kwargs)

    return _run


# --- data -----------------------------------------------------------------------


@pytest.fixture
def x4d() -> np.ndarray:
    """37 rows of (C, H, W) = (3, 4, 5) float32, channels with distinct offsets and scales."""
    rng = np.random.default_rng(42)
    x = rng.normal(size=(37, 3, 4, 5)) * np.array([1.0, 2.0, 0.5])[:, None, None]
    x += np.array([-1.0, 0.0, 5.0])[:, None, None]
    return x.astype(np.float32)


@pytest.fixture
def npy4d(tmp_path: Path, x4d: np.ndarray) -> Path:
    """``images.npy``: the 4-D float32 array `x4d`."""
    path = tmp_path / "images.npy"
    np.save(path, x4d)
    return path


@pytest.fixture
def features() -> np.ndarray:
    """53 rows of 6 float32 features with per-column offsets."""
    rng = np.random.default_rng(7)
    return (rng.normal(size=(53, 6)) * 1.5 + np.arange(6) - 2.0).astype(np.float32)


@pytest.fixture
def labels() -> np.ndarray:
    """53 int64 labels in [0, 4), every class present."""
    rng = np.random.default_rng(8)
    y = rng.integers(0, 4, size=53).astype(np.int64)
    y[:4] = np.arange(4)
    return y


@pytest.fixture
def h5file(tmp_path: Path, features: np.ndarray, labels: np.ndarray) -> Path:
    """``data.h5`` with datasets ``x`` (53 x 6 float32) and ``labels`` (int64 in [0, 4))."""
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=features)
        f.create_dataset("labels", data=labels)
    return path


@pytest.fixture
def h5single(tmp_path: Path, features: np.ndarray) -> Path:
    """``single.h5`` holding exactly one dataset, ``only`` (the same 53 x 6 features)."""
    path = tmp_path / "single.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("only", data=features)
    return path


@pytest.fixture
def features_npy(tmp_path: Path, features: np.ndarray) -> Path:
    """``features.npy``: the 53 x 6 features."""
    path = tmp_path / "features.npy"
    np.save(path, features)
    return path


@pytest.fixture
def labels_npy(tmp_path: Path, labels: np.ndarray) -> Path:
    """``labels.npy``: the 53 int64 labels."""
    path = tmp_path / "labels.npy"
    np.save(path, labels)
    return path
