"""A file-size limit on the outputs tests/test_hostile_faults.py leaves out: Kaldi
archives and their scp, HDF5 collections (plain and compressed), checkpoints in
every stats format, and every export container."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import normstats as ns
from tests.test_hostile_faults import LIMIT, _one_error

kaldiio = pytest.importorskip("kaldiio")

CHILD = """
import json, os, resource, signal, sys
from click.testing import CliRunner
import normstats.pipeline
from normstats.cli import cli
folder, cases, limit = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
os.chdir(folder)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the console script does
normstats.pipeline.block_rows_for = lambda row_bytes, batch_size, **_: 8  # checkpoints before the end
report = {}
for name, args in cases.items():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    result = CliRunner().invoke(cli, [a.replace("OUT", name) for a in args] + ["--force"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    report[name] = {"code": result.exit_code, "stderr": result.stderr,
                    "temporaries": sorted(f for f in os.listdir(".") if f.endswith(".tmp"))}
print(json.dumps(report))
"""


def _targets(args: list[str], name: str) -> list[str]:
    """The files the output spec of `args` names (both of ark,scp:A,B), for case `name`."""
    spec = [a for a in args if "OUT" in a][0].replace("OUT", name)
    if spec.startswith("ark"):
        return spec.split(":", 1)[1].split(",")
    return [spec.split(":")[0]]


CASES = {
    "apply-ark-scp": ["apply", "s.npz", "scp:feats.scp", "-q", "-o", "ark,scp:OUT.ark,OUT.scp"],
    "apply-ark": ["apply", "s.npz", "scp:feats.scp", "-q", "-o", "ark:OUT.ark"],
    "apply-group": ["apply", "s.npz", "scp:feats.scp", "-q", "-o", "OUT.h5:/train"],
    "apply-group-gzip": ["apply", "s.npz", "scp:feats.scp", "-q", "-o", "OUT.h5:/train", "--compression", "gzip"],
    "apply-h5-gzip": ["apply", "w.npz", "wide.npy", "-q", "-o", "OUT.h5", "--compression", "gzip"],
    "checkpoint-npz": ["fit-bn", "wide.npy", "--mode", "exact", "-q", "-o", "fit.npz",
                       "--checkpoint", "OUT.npz", "--checkpoint-every", "0"],
    "checkpoint-safetensors": ["fit-bn", "wide.npy", "--mode", "exact", "-q", "-o", "fit.npz",
                               "--checkpoint", "OUT.safetensors", "--checkpoint-every", "0"],
    "checkpoint-json": ["fit-centers", "wide.npy", "--labels", "l.npy", "--num-classes", "2", "--mode", "exact",
                        "-q", "-o", "fit.npz", "--checkpoint", "OUT.json", "--checkpoint-every", "0"],
    "export-espnet-npy": ["export", "w.npz", "--to", "espnet", "-o", "OUT.npy"],
    "export-espnet-npz": ["export", "w.npz", "--to", "espnet", "-o", "OUT.npz"],
    "export-espnet-h5": ["export", "wg.npz", "--to", "espnet", "-o", "OUT.h5"],
    "export-kaldi-ark": ["export", "w.npz", "--to", "kaldi", "-o", "OUT.ark"],
    "export-kaldi-mat": ["export", "w.npz", "--to", "kaldi", "-o", "OUT.mat"],
}


def test_a_file_size_limit_on_more_outputs_is_one_line_and_keeps_the_previous_files(run, tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    utts = {f"u{i:02d}": rng.normal(size=(100, 8)).astype(np.float32) for i in range(40)}  # 128 KB of output
    kaldiio.save_ark(str(tmp_path / "feats.ark"), utts, scp=str(tmp_path / "feats.scp"))
    ns.write_stats(ns.BatchNormExact().update(np.concatenate(list(utts.values()))).result(), str(tmp_path / "s.npz"))
    wide = rng.normal(size=(24, 6000)).astype(np.float32)  # stats of 6000 channels: > LIMIT in every format
    np.save(tmp_path / "wide.npy", wide)
    np.save(tmp_path / "l.npy", np.arange(24) % 2)
    ns.write_stats(ns.BatchNormExact().update(wide).result(), str(tmp_path / "w.npz"))
    assert run("fit-bn", "wide.npy", "--groups", "l.npy", "--num-groups", "2", "--mode", "exact",
               "-o", "wg.npz").exit_code == 0  # per-group statistics, which ESPnet writes to HDF5
    for name, args in CASES.items():
        for target in _targets(args, name):
            (tmp_path / target).write_bytes(b"previous " + name.encode())
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), json.dumps(CASES), str(LIMIT)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    for name, outcome in json.loads(child.stdout).items():
        assert outcome["code"] == 1, (name, outcome)
        message = _one_error(outcome["stderr"])
        assert "cannot write" in message and "file-size limit" in message and name in message, (name, message)
        assert "previous" in message and "intact" in message, (name, message)
        assert outcome["temporaries"] == [], (name, outcome)
        for target in _targets(CASES[name], name):
            assert (tmp_path / target).read_bytes() == b"previous " + name.encode(), (name, target)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
