#!/usr/bin/env python
"""Benchmark normstats against the raw read limit and its peers (scikit-learn, Dask).

Usage::

    python bench/run.py --size 2GB            # all cases, median of 3 runs each
    python bench/run.py --quick               # small data, a few cases: a smoke run
    python bench/run.py --only read,fit-bn-ema/h5 --repeat 5 --json out.json

Method
------
1. **Data** is generated once per (size, dim) into a cache folder (default: under the
   system temp dir; never inside the repo except under ``bench/data/``): float32 normal
   rows with per-column offsets and scales, written in pieces of about 32 MB (so
   generation memory stays bounded) to ``.npy``, HDF5 contiguous, HDF5 chunked (~1 MB
   chunks of whole rows) and HDF5 gzip-1 + shuffle (same chunks), with int64 labels for
   K = 10, 1 000 and 100 000 as ``.npy`` and an exact stats file for ``apply``.
2. **Warm cache, warm memory**: right before every run the case's input files are read
   (these VMs drop page cache left idle for about a minute) and input-size + 512 MB of
   memory is touched and freed (the first touch of memory the VM gave back to the host
   runs at ~0.4 GB/s, which would otherwise charge a case for what ran before it).
3. Each case runs ``--repeat`` times (in rounds: every case once, then again), **each run
   in a fresh interpreter**
   (``python bench/run.py --case NAME/FORMAT``). The child imports what the case needs,
   resets its peak-RSS mark and records its RSS (the baseline of an idle interpreter
   with those modules), then times only the work: open, read, compute, close. Peak
   memory is the growth of the peak RSS (VmHWM; ``ru_maxrss`` off Linux) over that
   baseline, the largest over the runs; throughput is input bytes /
   seconds in GB/s (1 GB = 1e9 B), the median over the runs. ``--size`` uses binary
   units (1GB = 2**30 B).
4. The report gives each case's ratio to the raw limit of the same format (plain reads
   into one reused 8 MB buffer + ``sum(0)`` per block; for ``apply``, a plain read + write
   + fsync copy of the same bytes) and, for fit-bn, to scikit-learn and Dask on the same
   format, checked against the targets of the benchmark issue. Compare ratios within one
   run only: absolute figures on shared VMs drift from run to run.
5. The ``-jobs2`` cases run the local engine with 2 processes, the ``-dask2`` cases the Dask
   engine on a local cluster of 2 single-threaded workers, started (its workers' imports done
   and kernels loaded) before the clock and shut down after it, as a cluster in use is; their
   peak memory is the driving process's only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20
BLOCK_BYTES = 8 * MB  # the raw loops' block, the same as normstats' read block
H5_CACHE_BYTES = 16 * MB  # chunk cache of the raw HDF5 loops (>= one chunk)
DASK_CHUNK_BYTES = 64 * MB
PIECE_BYTES = 32 * MB  # generation writes this much at a time
FORMATS = ("npy", "h5", "h5chunk", "h5gzip")
FILES = {"npy": "x.npy", "h5": "x_contiguous.h5", "h5chunk": "x_chunked.h5", "h5gzip": "x_gzip.h5",
         "ark": "feats.ark", "h5coll": "collection.h5"}
# Sequence collections, made on demand from x.npy's rows (issue 13): a Kaldi archive of
# ARK_FRAMES-frame utterances with its scp, and an HDF5 file of COLLECTION_DATASETS datasets
# (ESPnet1's layout), each 1/COLLECTION_DATASETS of the rows.
COLLECTIONS = ("ark", "h5coll")
ARK_FRAMES = 500
COLLECTION_DATASETS = 100_000
CLASS_COUNTS = (10, 1000, 100_000)
GROUP_COUNTS = (1000, 100_000)  # fit-bn --groups G: the labels files of these K serve as groups
BATCH_SIZE = 256
MEM_KD_FACTOR = 3.5  # the O(K*D) memory allowance: this many float64 (K, D) arrays
FIT_MEMORY_MB = 64  # fit-bn / apply peak, whatever the file size
DATA_VERSION = 1
PRELOADED = ("normstats.pipeline", "normstats.readers.api", "normstats.readers.h5dataset",
             "normstats.readers.h5collection", "normstats.writers.stats_files")
QUICK_CASES = ("read", "mmap", "gunzip-1t", "copy-fsync/npy", "sklearn/npy", "dask/npy",
               "fit-bn-ema", "fit-bn-exact/npy", "fit-centers-exact-K1000", "apply/npy")


# --- data --------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """The generated files of one (rows, dim) data set."""

    folder: Path
    rows: int
    dim: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * 4

    @property
    def block_rows(self) -> int:
        return max(1, BLOCK_BYTES // (self.dim * 4))

    @property
    def chunk_rows(self) -> int:
        return max(1, MB // (self.dim * 4))

    @property
    def stats(self) -> Path:
        return self.folder / "stats.npz"

    def path(self, fmt: str) -> Path:
        return self.folder / FILES[fmt]

    def spec(self, fmt: str) -> str:
        if fmt in COLLECTIONS:
            return f"scp:{self.folder / 'feats.scp'}" if fmt == "ark" else f"{self.path(fmt)}:/"
        return str(self.path(fmt)) if fmt == "npy" else f"{self.path(fmt)}:data"

    def labels(self, k: int) -> Path:
        return self.folder / f"labels_K{k}.npy"

    def output(self, fmt: str, tag: str) -> Path:
        return self.folder / f"out-{tag}.{'npy' if fmt == 'npy' else 'h5'}"

    def inputs(self, case_id: Optional[str] = None) -> list[Path]:
        """The files a case reads (all of them without `case_id`)."""
        if case_id is None:
            return [self.path(f) for f in FORMATS] + [self.labels(k) for k in CLASS_COUNTS] + [self.stats]
        name, fmt = case_id.split("/")
        if fmt == "ark":
            return [self.path(fmt), self.folder / "feats.scp"] + ([self.stats] if name.startswith("apply") else [])
        extra = [self.labels(int(name.rsplit("K", 1)[1]))] if "-K" in name and name.startswith("fit-") else []
        return [self.path(fmt), *extra] + ([self.stats] if name.startswith("apply") else [])


def parse_size(text: str) -> int:
    """'2GB', '512MB', '1.5G', '100000' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r} is not like 2GB or 512MB")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024**power)


def data_folder(base: Optional[str], rows: int, dim: int) -> Path:
    """The cache folder of (rows, dim); refuses a place inside the repo but bench/data/."""
    root = Path(base).resolve() if base else Path(tempfile.gettempdir()) / "normstats-bench"
    allowed = REPO / "bench" / "data"
    if root.is_relative_to(REPO) and not root.is_relative_to(allowed):
        sys.exit(f"bench: the data dir {root} is inside the repo; use {allowed} or a folder outside it")
    return root / f"rows{rows}_dim{dim}"


def write_npy_header(f: BinaryIO, shape: tuple[int, ...], dtype: type) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)


def generate(data: Data, seed: int = 0) -> None:
    """Write every input of `data` piece by piece; the marker file goes last."""
    import h5py
    import normstats as ns

    data.folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0.0, 20.0, data.dim).astype(np.float32)
    scales = rng.uniform(0.1, 5.0, data.dim).astype(np.float32)
    piece_rows = data.chunk_rows * max(1, PIECE_BYTES // (data.chunk_rows * data.dim * 4))
    buffer = np.empty((min(piece_rows, data.rows), data.dim), np.float32)
    chunks = (min(data.chunk_rows, data.rows), data.dim)
    layouts = {"h5": {}, "h5chunk": {"chunks": chunks},
               "h5gzip": {"chunks": chunks, "compression": "gzip", "compression_opts": 1, "shuffle": True}}
    with contextlib.ExitStack() as stack:
        npy = stack.enter_context(open(data.path("npy"), "wb"))
        write_npy_header(npy, (data.rows, data.dim), np.float32)
        sets = [stack.enter_context(h5py.File(data.path(fmt), "w")).create_dataset(
            "data", shape=(data.rows, data.dim), dtype=np.float32, **layout) for fmt, layout in layouts.items()]
        labels = {k: stack.enter_context(open(data.labels(k), "wb")) for k in CLASS_COUNTS}
        for f in labels.values():
            write_npy_header(f, (data.rows,), np.int64)
        for start in range(0, data.rows, piece_rows):
            x = buffer[: min(piece_rows, data.rows - start)]
            rng.standard_normal(out=x, dtype=np.float32)
            x *= scales
            x += offsets
            npy.write(x.data)
            for dataset in sets:
                dataset.write_direct(x, dest_sel=np.s_[start : start + len(x)])
            for k, f in labels.items():
                f.write(rng.integers(0, k, len(x), dtype=np.int64).data)
            if start == 0:
                ns.write_stats(ns.BatchNormExact().update(x).result(), str(data.stats))
    marker = {"rows": data.rows, "dim": data.dim, "seed": seed, "version": DATA_VERSION}
    (data.folder / "complete.json").write_text(json.dumps(marker))


def ensure_data(folder: Path, rows: int, dim: int) -> Data:
    data = Data(folder, rows, dim)
    marker = folder / "complete.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == DATA_VERSION:
        return data
    log(f"generating {rows:,} x {dim} float32 ({data.nbytes / 1e9:.2f} GB per format) in {folder}")
    started = time.perf_counter()
    generate(data)
    log(f"generated in {time.perf_counter() - started:.0f} s")
    return data


def ensure_collection(data: Data, fmt: str) -> None:
    """Write the collection `fmt` from x.npy's rows, piece by piece; its marker goes last."""
    marker = data.folder / f"complete-{fmt}.json"
    if marker.exists():
        return
    log(f"generating the {fmt} collection in {data.folder}")
    started = time.perf_counter()
    x = np.load(data.path("npy"), mmap_mode="r")
    if fmt == "ark":
        import kaldiio

        with kaldiio.WriteHelper(f"ark,scp:{data.path('ark')},{data.folder / 'feats.scp'}") as writer:
            for number, start in enumerate(range(0, data.rows, ARK_FRAMES)):
                writer(f"utt{number:07d}", np.array(x[start:start + ARK_FRAMES]))
    else:
        import h5py

        frames = max(1, data.rows // COLLECTION_DATASETS)
        with h5py.File(data.path(fmt), "w") as f:
            for number in range(min(COLLECTION_DATASETS, data.rows)):
                stop = data.rows if number == COLLECTION_DATASETS - 1 else (number + 1) * frames
                f.create_dataset(f"utt{number:07d}", data=np.array(x[number * frames:stop]))
    marker.write_text(json.dumps({"rows": data.rows, "dim": data.dim}))
    log(f"generated in {time.perf_counter() - started:.0f} s")


def load_data(folder: Path) -> Data:
    marker = json.loads((folder / "complete.json").read_text())
    return Data(folder, int(marker["rows"]), int(marker["dim"]))


def warm_cache(paths: list[Path]) -> None:
    """Read every file once so that the measured run finds it in the page cache.

    Done before every run, not once: a proactive reclaimer (DAMON 'pageout' on these
    VMs) drops page cache that has not been touched for about a minute.
    """
    buffer = bytearray(BLOCK_BYTES)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def available_bytes() -> int:
    with contextlib.suppress(OSError, StopIteration):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        return int(next(line for line in meminfo if line.startswith("MemAvailable")).split()[1]) * 1024
    return 1 << 62


def prefault(nbytes: int) -> None:
    """Touch and free `nbytes` of memory (at most half of what is available).

    These VMs hand idle memory back to the host, and the first touch of such a
    page runs at ~0.4 GB/s: without this, a case's buffers and the page cache of
    the files it writes would cost more or less depending on what ran before it.
    """
    memory = np.empty(min(nbytes, available_bytes() // 2), np.uint8)
    memory[::4096] = 1
    del memory


# --- cases (run in the child) ----------------------------------------------------


def raw_blocks(data: Data, fmt: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) over `fmt`, read into one reused 8 MB buffer: readinto for
    .npy, read_direct for HDF5."""
    buffer = np.empty((min(data.block_rows, data.rows), data.dim), np.float32)
    starts = range(0, data.rows, data.block_rows)
    if fmt == "npy":
        with open(data.path(fmt), "rb", buffering=0) as f:
            major, _ = np.lib.format.read_magic(f)  # skip the header to the data
            (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)
            for start in starts:
                block = buffer[: min(data.block_rows, data.rows - start)]
                if f.readinto(memoryview(block).cast("B")) != block.nbytes:
                    raise OSError(f"{data.path(fmt)}: short read")
                yield start, block
        return
    import h5py

    with h5py.File(data.path(fmt), "r", rdcc_nbytes=H5_CACHE_BYTES) as f:
        dataset = f["data"]
        for start in starts:
            block = buffer[: min(data.block_rows, data.rows - start)]
            dataset.read_direct(block, source_sel=np.s_[start : start + len(block)])
            yield start, block


def case_read(data: Data, fmt: str) -> None:
    """Raw limit: reused-buffer reads + sum(0) per block."""
    total = np.zeros(data.dim)
    for _, block in raw_blocks(data, fmt):
        total += block.sum(axis=0)


def case_read_collection(data: Data, fmt: str) -> None:
    """Raw limit of a collection: each utterance read as the standard reader reads it
    (kaldiio.load_scp_sequential; h5py read_direct into a reused buffer, keys in sorted
    order) + sum(0)."""
    total = np.zeros(data.dim)
    if fmt == "ark":
        import kaldiio

        for _, matrix in kaldiio.load_scp_sequential(str(data.folder / "feats.scp")):
            total += matrix.sum(axis=0)
        return
    import h5py

    buffer = np.empty((data.rows // min(COLLECTION_DATASETS, data.rows) + data.rows % COLLECTION_DATASETS + 1,
                       data.dim), np.float32)
    with h5py.File(data.path(fmt), "r") as f:
        for key in sorted(f):
            dataset = f[key]
            block = buffer[:dataset.shape[0]]
            dataset.read_direct(block)
            total += block.sum(axis=0)


def case_mmap(data: Data, fmt: str) -> None:
    """np.load(mmap_mode='r') + sum(0) per block (RSS grows with the file)."""
    x = np.load(data.path(fmt), mmap_mode="r")
    total = np.zeros(data.dim)
    for start in range(0, data.rows, data.block_rows):
        total += x[start : start + data.block_rows].sum(axis=0)


def case_decompress(data: Data, fmt: str) -> None:
    """Reads only: for gzip HDF5, single-threaded decompression throughput."""
    for _ in raw_blocks(data, fmt):
        pass


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def case_copy(data: Data, fmt: str, *, fsync: bool) -> None:
    """Plain read + write of the same bytes (apply's baseline), optionally fsynced."""
    import h5py

    output = data.output(fmt, "copy")
    if fmt == "npy":
        with open(output, "wb") as f:
            write_npy_header(f, (data.rows, data.dim), np.float32)
            for _, block in raw_blocks(data, fmt):
                f.write(block.data)
    else:
        with h5py.File(output, "w") as f:
            dataset = f.create_dataset("data", shape=(data.rows, data.dim), dtype=np.float32)
            for start, block in raw_blocks(data, fmt):
                dataset.write_direct(block, dest_sel=np.s_[start : start + len(block)])
    if fsync:
        fsync_file(output)


def case_sklearn(data: Data, fmt: str) -> None:
    """StandardScaler.partial_fit over the raw loop's blocks."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for _, block in raw_blocks(data, fmt):
        scaler.partial_fit(block)


def case_dask(data: Data, fmt: str) -> None:
    """dask.array mean + var in one dask.compute, threaded, ~64 MB chunks."""
    import dask
    import dask.array as da
    import h5py

    chunk_rows = max(data.chunk_rows, DASK_CHUNK_BYTES // (data.dim * 4))
    with contextlib.ExitStack() as stack:
        if fmt == "npy":
            source = np.load(data.path(fmt), mmap_mode="r")
        else:
            source = stack.enter_context(h5py.File(data.path(fmt), "r"))["data"]
        x = da.from_array(source, chunks=(chunk_rows, data.dim))
        dask.compute(x.mean(axis=0), x.var(axis=0), scheduler="threads")


def case_fit_bn(data: Data, fmt: str, *, mode: str) -> None:
    """normstats fit-bn as the CLI runs it: open_stream -> batchnorm_state -> run_fit."""
    import normstats as ns

    with ns.open_stream([data.spec(fmt)]) as stream:
        ns.run_fit(ns.batchnorm_state(mode, batch_size=BATCH_SIZE, axes="auto"), stream)


def case_fit_bn_jobs(data: Data, fmt: str, *, mode: str, jobs: int) -> None:
    """normstats fit-bn --jobs N: row ranges in N processes, states merged (exact) or chained (ema)."""
    import normstats as ns

    recipe = ns.Recipe("batchnorm", mode, {"batch_size": BATCH_SIZE, "axes": "auto"})
    with ns.open_stream([data.spec(fmt)]) as stream:
        ns.run_fit_parallel(recipe, stream, jobs=jobs)


def case_fit_bn_dask(data: Data, fmt: str, *, mode: str, workers: int) -> Iterator[None]:
    """normstats fit-bn --engine dask on a local cluster of `workers` processes.

    The cluster starts before the clock (about 1 s here; on a real cluster it
    is already up): the yield separates set-up from the timed fit.
    """
    import normstats as ns

    recipe = ns.Recipe("batchnorm", mode, {"batch_size": BATCH_SIZE, "axes": "auto"})
    with ns.dask_client(workers=workers) as client, ns.open_stream([data.spec(fmt)]) as stream:
        _warm(client)
        yield
        ns.run_fit_dask(recipe, stream, client)
        yield  # the cluster's shutdown is not the fit's


def _warm(client) -> None:
    """Have every worker import normstats and h5py and load the kernels, as a cluster in
    use already has (the in-process cases load them before the clock too)."""
    for module in ("normstats.tasks", "h5py") + PRELOADED:
        client.run(importlib.import_module, module)
    client.run(_warm_kernels)


def _warm_kernels() -> None:
    import normstats.kernels

    normstats.kernels.warm_up(np.dtype(np.float32))


def case_apply_dask(data: Data, fmt: str, *, workers: int) -> Iterator[None]:
    """normstats apply --engine dask on a local cluster (started before the clock)."""
    import normstats as ns

    normalizer = ns.Normalizer(ns.read_stats(str(data.stats)))
    with ns.dask_client(workers=workers) as client, ns.open_stream([data.spec(fmt)]) as stream:
        _warm(client)
        yield
        ns.apply_dask(normalizer, stream, str(data.output(fmt, "apply")), client)
        yield  # the cluster's shutdown is not the apply's


def case_fit_bn_groups(data: Data, fmt: str, *, groups: int) -> None:
    """normstats fit-bn --mode exact --groups: per-group statistics (per-speaker CMVN), the
    labels file of K = `groups` as the groups."""
    import normstats as ns

    recipe = ns.Recipe("batchnorm", "exact", {"batch_size": BATCH_SIZE, "axes": "auto", "num_groups": groups})
    with ns.open_stream([data.spec(fmt)]) as stream, ns.open_stream([str(data.labels(groups))]) as labels:
        ns.run_fit(recipe.build(), stream, side={"groups": labels}, spend=True)  # as the CLI does


def case_fit_centers(data: Data, fmt: str, *, mode: str, k: int) -> None:
    """normstats fit-centers as the CLI runs it, labels as a side stream."""
    import normstats as ns

    with ns.open_stream([data.spec(fmt)]) as stream, ns.open_stream([str(data.labels(k))]) as labels:
        ns.run_fit(ns.centers_state(k, mode, batch_size=BATCH_SIZE), stream, side={"labels": labels}, spend=True)


def case_apply(data: Data, fmt: str) -> None:
    """normstats apply as the CLI runs it: read_stats -> Normalizer -> apply_stats."""
    import normstats as ns

    normalizer = ns.Normalizer(ns.read_stats(str(data.stats)))
    with ns.open_stream([data.spec(fmt)]) as stream:
        ns.apply_stats(normalizer, stream, str(data.output(fmt, "apply")))


def case_apply_collection(data: Data, fmt: str) -> None:
    """normstats apply over a collection, keys kept: scp: -> ark,scp:, HDF5 group -> HDF5 group."""
    import normstats as ns
    from normstats.writers.collections import collection_output

    normalizer = ns.Normalizer(ns.read_stats(str(data.stats)))
    out = data.folder / "out-apply"
    spec = f"ark,scp:{out}.ark,{out}.scp" if fmt == "ark" else f"{out}.h5:/"
    with ns.open_stream([data.spec(fmt)]) as stream:
        ns.apply_collection(normalizer, stream, collection_output(spec))


def case_assign(data: Data, fmt: str, *, k: int) -> Iterator[None]:
    """normstats assign: nearest of K random centers (made before the clock) to HDF5."""
    import normstats as ns

    nearest = ns.NearestCenters(np.random.default_rng(k).normal(size=(k, data.dim)))
    with ns.open_stream([data.spec(fmt)]) as stream:
        yield
        ns.assign_rows(nearest, stream, str(data.folder / f"out-assign-K{k}.h5"))


CaseFunction = Callable[[Data, str], None]
# name -> (function, formats, modules imported before the baseline)
CASES: dict[str, tuple[CaseFunction, tuple[str, ...], tuple[str, ...]]] = {
    "read": (case_read, FORMATS, ()),
    "mmap": (case_mmap, ("npy",), ()),
    "gunzip-1t": (case_decompress, ("h5gzip",), ()),
    "copy": (functools.partial(case_copy, fsync=False), ("npy", "h5"), ()),
    "copy-fsync": (functools.partial(case_copy, fsync=True), ("npy", "h5"), ()),
    "sklearn": (case_sklearn, FORMATS, ("sklearn.preprocessing",)),
    "dask": (case_dask, FORMATS, ("dask.array",)),
    "fit-bn-ema": (functools.partial(case_fit_bn, mode="ema"), FORMATS, ()),
    "fit-bn-exact": (functools.partial(case_fit_bn, mode="exact"), FORMATS, ()),
    # On gzip HDF5, the two processes are how chunks get decoded on both cores.
    "fit-bn-ema-jobs2": (functools.partial(case_fit_bn_jobs, mode="ema", jobs=2), FORMATS, ()),
    "fit-bn-exact-jobs2": (functools.partial(case_fit_bn_jobs, mode="exact", jobs=2), FORMATS, ()),
    "fit-bn-ema-dask2": (functools.partial(case_fit_bn_dask, mode="ema", workers=2), ("npy", "h5"),
                         ("distributed",)),
    "fit-bn-exact-dask2": (functools.partial(case_fit_bn_dask, mode="exact", workers=2), ("npy", "h5"),
                           ("distributed",)),
    **{f"fit-centers-{mode}-K{k}": (functools.partial(case_fit_centers, mode=mode, k=k), ("npy",), ())
       for k in CLASS_COUNTS for mode in ("ema", "exact")},
    **{f"fit-bn-groups-K{g}": (functools.partial(case_fit_bn_groups, groups=g), ("npy",), ()) for g in GROUP_COUNTS},
    "apply": (case_apply, ("npy", "h5"), ()),
    "apply-dask2": (functools.partial(case_apply_dask, workers=2), ("npy", "h5"), ("distributed",)),
    # Collections (issue 13): the fit reads the utterances by key; raw = the standard reader's loop.
    # kaldiio is imported before the clock by both (a Kaldi user's tools have it loaded).
    "read-collection": (case_read_collection, COLLECTIONS, ("kaldiio",)),
    "fit-bn-exact-collection": (functools.partial(case_fit_bn, mode="exact"), COLLECTIONS, ("kaldiio",)),
    "apply-collection": (case_apply_collection, COLLECTIONS, ("kaldiio",)),
    # Not K = 100 000: about 9 minutes per GB here (2·D·K = 51 MFLOP a row).
    **{f"assign-K{k}": (functools.partial(case_assign, k=k), ("npy",), ()) for k in (10, 1000)},
}


def memory_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB; ru_maxrss where /proc is missing.

    Not ru_maxrss on Linux: a child keeps its parent's high-water mark across
    fork + exec, so it would hide any peak below the parent's resident size.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / (MB if sys.platform == "darwin" else 1024)  # bytes on macOS, else KiB
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), dropping the import-time peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def run_child(case_id: str, folder: Path) -> dict:
    """Internal mode: import, take the baseline, time the work of one case."""
    name, fmt = case_id.split("/")
    function, _, modules = CASES[name]
    for module in ("h5py", "normstats") + modules:
        importlib.import_module(module)
    data = load_data(folder)
    if name.startswith(("fit-", "apply", "assign")):
        # The compiled kernels load from numba's cache before the clock, as an import does
        # (start-up is measured apart, on README's commands); so do the modules a run loads
        # on first use (without .pyc files, e.g. PYTHONDONTWRITEBYTECODE, compiling them
        # took ~0.3 s: a third of a 1 GB fit-bn's time).
        import normstats.kernels

        for module in PRELOADED:
            importlib.import_module(module)
        normstats.kernels.warm_up(np.dtype(np.float32))
    staged = inspect.isgeneratorfunction(function)  # set-up, yield, then the timed work
    if staged:
        work = function(data, fmt)
        next(work)
    reset_peak()
    base = memory_mb("VmRSS")
    started = time.perf_counter()
    if staged:
        next(work, None)  # to the next yield: a case that yields again tears down after the clock
    else:
        function(data, fmt)
    seconds = time.perf_counter() - started
    peak = memory_mb("VmHWM")
    if staged:
        for _ in work:
            pass
    return {"seconds": seconds, "bytes": data.nbytes, "base_mb": base, "rss_mb": peak, "peak_mb": peak - base}


# --- running and reporting (the parent) -------------------------------------------


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def case_ids(only: Optional[list[str]]) -> list[str]:
    """Every NAME/FORMAT in registry order, filtered by `only` (ids or bare names)."""
    ids = [f"{name}/{fmt}" for name, (_, formats, _) in CASES.items() for fmt in formats]
    if not only:
        return ids
    unknown = [o for o in only if o not in ids and o not in CASES]
    if unknown:
        sys.exit(f"bench: unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)} (or NAME/FORMAT)")
    return [i for i in ids if i in only or i.split("/")[0] in only]


def missing_module(name: str) -> Optional[str]:
    modules = CASES[name][2]
    top = [m.split(".")[0] for m in modules]
    return next((m for m in top if importlib.util.find_spec(m) is None), None)


def run_once(case_id: str, data: Data) -> dict:
    """One run of a case in a fresh interpreter; its outputs are removed after."""
    command = [sys.executable, __file__, "--case", case_id, "--folder", str(data.folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    for leftover in data.folder.glob("out-*"):
        leftover.unlink()
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_all(ids: list[str], data: Data, repeat: int) -> dict[str, dict]:
    """Run every case `repeat` times, in rounds (all cases once, then again) so that
    slow drifts of the machine touch every case alike; median GB/s, largest peak."""
    rows: dict[str, dict] = {}
    for case_id in ids:
        name, fmt = case_id.split("/")
        missing = missing_module(name)
        rows[case_id] = {"case": name, "format": fmt, "runs": []}
        if missing:
            rows[case_id]["skipped"] = f"{missing} is not installed (pip install -e '.[bench]')"
    for round_ in range(repeat):
        for case_id, row in rows.items():
            if "skipped" in row or "error" in row:
                continue
            log(f"round {round_ + 1}/{repeat}: {case_id}")
            os.sync()  # the outputs of the case before are written back now, not during this one
            warm_cache(data.inputs(case_id))  # this VM may drop page cache idle for a minute
            prefault(data.nbytes + 512 * MB)
            run = run_once(case_id, data)
            if "error" in run:
                row["error"] = run["error"]
            else:
                row["runs"].append(run)
    for row in rows.values():
        runs = row["runs"]
        if runs and "error" not in row:
            row.update(gbps=statistics.median(r["bytes"] / r["seconds"] / 1e9 for r in runs),
                       peak_mb=max(r["peak_mb"] for r in runs), rss_mb=max(r["rss_mb"] for r in runs),
                       base_mb=statistics.median(r["base_mb"] for r in runs))
    return rows


def raw_reference(name: str, fmt: str) -> Optional[str]:
    """The 'raw limit' a case is compared with: the copy for apply, else the read."""
    if fmt in COLLECTIONS:
        return None if name == "read-collection" else f"read-collection/{fmt}"
    if name.startswith("apply"):
        return f"copy-fsync/{fmt}"
    return None if name == "read" else f"read/{fmt}"


def _per_class(name: str) -> bool:
    return name.startswith(("fit-centers", "fit-bn-groups"))


def targets(name: str, fmt: str) -> list[tuple[str, str, float]]:
    """(label, reference case, minimum ratio) from the benchmark issue (issue 12)."""
    if fmt in COLLECTIONS:  # issue 13 sets no ratio, only bounded memory
        return []
    if _per_class(name):
        return [("raw", "read/npy", 0.8 if int(name.rsplit("K", 1)[1]) <= 1000 else 0.3)]
    if name.startswith("fit-bn"):
        if fmt == "h5gzip":
            return [("1-thread gunzip", "gunzip-1t/h5gzip", 1.7)]
        raw = 0.9 if fmt == "h5chunk" else 1.2
        return [("raw", f"read/{fmt}", raw), ("sklearn", f"sklearn/{fmt}", 7.0), ("dask", f"dask/{fmt}", 5.0)]
    if name.startswith("apply"):
        return [("copy+fsync", f"copy-fsync/{fmt}", 0.9)]
    return []


def memory_bound_mb(name: str, dim: int) -> Optional[float]:
    """Issue 12: fit-bn and apply at most FIT_MEMORY_MB whatever the file size; per-class
    fits 3 read blocks + MEM_KD_FACTOR float64 (K, D) arrays (700 MB at K = 100 000, D = 256)."""
    if not name.startswith(("fit-", "apply")):
        return None
    if not _per_class(name):
        return FIT_MEMORY_MB
    k = int(name.rsplit("K", 1)[1])
    return (3 * BLOCK_BYTES + MEM_KD_FACTOR * k * dim * 8) / MB


def ratio(results: dict[str, dict], row: dict, reference: Optional[str]) -> Optional[float]:
    other = results.get(reference or "", {})
    if "gbps" not in row or "gbps" not in other:
        return None
    return row["gbps"] / other["gbps"]


def verdict(results: dict[str, dict], row: dict, dim: int) -> tuple[str, str]:
    """The target text and whether it is met ('yes', or 'no: ...' naming what failed)."""
    name, fmt = row["case"], row["format"]
    goals = targets(name, fmt)
    bound = memory_bound_mb(name, dim)
    text = ", ".join(f">={m:g}x {label}" for label, _, m in goals)
    if bound is not None:
        text += f"{'; ' if text else ''}<={bound:.0f} MB"
    if not text or "gbps" not in row:
        return text, ""
    failed, unknown = [], []
    for label, reference, minimum in goals:
        value = ratio(results, row, reference)
        if value is None:
            unknown.append(label)
        elif value < minimum:
            failed.append(f"{value:.2f}x {label}")
    if bound is not None and row["peak_mb"] > bound:
        failed.append(f"{row['peak_mb']:.0f} MB")
    met = "no: " + ", ".join(failed) if failed else "yes"
    return text, met + (f" (no {', '.join(unknown)})" if unknown else "")


def fmt_ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def table(results: dict[str, dict], dim: int) -> list[str]:
    lines = ["| case | format | GB/s | (range) | peak MB | x raw limit | x sklearn | x dask | target | met? |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in results.values():
        name, fmt = row["case"], row["format"]
        if "gbps" not in row:
            lines.append(f"| {name} | {fmt} | – | | – | | | | | {row.get('skipped') or 'error: ' + row['error']} |")
            continue
        peers = name.startswith("fit-bn")
        rates = [r["bytes"] / r["seconds"] / 1e9 for r in row["runs"]]
        cells = [name, fmt, f"{row['gbps']:.2f}", f"{min(rates):.2f}-{max(rates):.2f}", f"{row['peak_mb']:.0f}",
                 fmt_ratio(ratio(results, row, raw_reference(name, fmt))),
                 fmt_ratio(ratio(results, row, f"sklearn/{fmt}") if peers else None),
                 fmt_ratio(ratio(results, row, f"dask/{fmt}") if peers else None),
                 *verdict(results, row, dim)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def source_state() -> str:
    """Which normstats the cases import: the repo's commit (flagging uncommitted changes)
    or the folder of another copy, with a digest of its sources to spot changes."""
    package = Path(importlib.util.find_spec("normstats").origin).parent
    cli = Path(importlib.util.find_spec("normstats.cli").origin).parent
    digest = hashlib.sha1()
    for label, folder in (("normstats", package), ("cli", cli)):
        for path in sorted(folder.glob("*.py")):
            digest.update(f"{label}/{path.name}".encode() + path.read_bytes())
    if not package.resolve().is_relative_to(REPO):
        return f"{package} (digest {digest.hexdigest()[:8]})"

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""
    dirty = " + uncommitted changes" if git("status", "--porcelain", "core", "cli") else ""
    return f"commit {git('rev-parse', '--short', 'HEAD') or 'unknown'}{dirty} (digest {digest.hexdigest()[:8]})"


def damon_state() -> str:
    """Whether DAMON (which pages out idle memory and page cache) runs on this machine."""
    states = [p.read_text().strip() for p in Path("/sys/kernel/mm/damon/admin/kdamonds").glob("*/state")]
    return " ".join(states) or "off or not visible"


def machine_facts(data: Data, repeat: int) -> dict:
    sizes = {fmt: round(data.path(fmt).stat().st_size / 1e9, 3) for fmt in FORMATS}
    return {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0], "numpy": np.__version__, "h5py": version("h5py"),
        "normstats": version("normstats"), "commit": source_state(),
        "scikit-learn": version("scikit-learn"), "dask": version("dask"),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "not set"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "not set"),
        "damon": damon_state(),
        "rows": data.rows, "dim": data.dim, "input_gb": round(data.nbytes / 1e9, 3),
        "file_gb": sizes, "repeat": repeat, "data_dir": str(data.folder),
    }


def report(facts: dict, results: dict[str, dict]) -> str:
    bases = sorted({f"{row['base_mb']:.0f}" for row in results.values() if "base_mb" in row}, key=float)
    base_span = "-".join(bases[:1] + bases[1:][-1:]) or "?"
    lines = [
        f"# normstats benchmark: {facts['rows']:,} x {facts['dim']} float32 ({facts['input_gb']} GB per format)",
        "",
        f"- machine: {facts['cpu']}, {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable); "
        f"python {facts['python']}, numpy {facts['numpy']}, h5py {facts['h5py']}, normstats {facts['normstats']}, "
        f"scikit-learn {facts['scikit-learn']}, dask {facts['dask']}",
        f"- normstats imported: {facts['commit']}",
        f"- OPENBLAS_CORETYPE: {facts['OPENBLAS_CORETYPE']}; OPENBLAS_L2_SIZE: {facts['OPENBLAS_L2_SIZE']} "
        "(left as found)",
        f"- files (GB): {', '.join(f'{k} {v}' for k, v in facts['file_gb'].items())}",
        f"- DAMON proactive reclaim: {facts['damon']}; before every run the inputs are re-read and "
        "input-size + 512 MB of memory is touched and freed (no host first-touch cost in the run)",
        f"- figures: warm page cache, median of {facts['repeat']} fresh-process runs; GB/s = input bytes "
        "(1e9) / s; peak MB = largest growth of peak RSS over the idle interpreter with the same imports "
        f"({base_span} MB, subtracted)",
        "- x raw limit: against `read` of the same format (reused 8 MB buffer + sum(0)); for apply against "
        "`copy-fsync` (read + write + fsync of the same bytes, as apply fsyncs its output)",
        "",
        *table(results, facts["dim"]),
    ]
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="cases: " + ", ".join(CASES) + "; formats: " + ", ".join(FORMATS))
    parser.add_argument("--size", type=parse_size, help="bytes per format, e.g. 2GB, 512MB (default 1GB; "
                        "64MB with --quick)")
    parser.add_argument("--dim", type=int, default=256, help="columns (default 256)")
    parser.add_argument("--data-dir", help="cache folder of the generated data (default: <tmp>/normstats-bench)")
    parser.add_argument("--only", type=lambda s: [c for c in s.split(",") if c],
                        help="comma list of case names or NAME/FORMAT ids to run")
    parser.add_argument("--repeat", type=int, help="runs per case, median reported (default 3; 1 with --quick)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="small data, a few cases: a smoke run")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_child(args.case, Path(args.folder))))
        return
    size = args.size or parse_size("64MB" if args.quick else "1GB")
    repeat = args.repeat or (1 if args.quick else 3)
    rows = max(1, size // (args.dim * 4))
    ids = case_ids(args.only or (list(QUICK_CASES) if args.quick else None))
    data = ensure_data(data_folder(args.data_dir, rows, args.dim), rows, args.dim)
    for fmt in sorted({case_id.split("/")[1] for case_id in ids} & set(COLLECTIONS)):
        ensure_collection(data, fmt)
    log("warming the page cache")
    warm_cache(data.inputs())
    facts = machine_facts(data, repeat)
    results = measure_all(ids, data, repeat)
    if source_state() != facts["commit"]:
        facts["commit"] += f"; CHANGED during the run, now {source_state()}"
    print(report(facts, results))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": facts, "results": list(results.values())}, indent=1))


if __name__ == "__main__":
    main()
