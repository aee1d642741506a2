"""The files a command touches (issue 11): outputs that are inputs or each other, outputs
that appear meanwhile, temporaries of dead writers, names too long, checkpoints over other files."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import normstats as ns
import normstats.cli.commands
import normstats.pipeline
import normstats.writers.atomic
import normstats.writers.stats_h5


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


def _error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture
def made(tmp_path: Path) -> Path:
    """x.npy (40 x 3), l.npy (labels in [0, 4)), w.npy (weights), g.npy (groups in [0, 2)),
    gamma.npy (3,), s.npz (ema stats), e.npz (exact stats), c.npz (exact centers),
    bn.safetensors (a torch export of e.npz)."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(40, 3)))
    np.save(tmp_path / "l.npy", np.arange(40) % 4)
    np.save(tmp_path / "w.npy", rng.uniform(0.5, 1.5, size=40))
    np.save(tmp_path / "g.npy", np.arange(40) % 2)
    np.save(tmp_path / "gamma.npy", np.full(3, 2.0))
    x = np.load(tmp_path / "x.npy")
    ns.write_stats(ns.BatchNormEMA(batch_size=8).update(x).result(), str(tmp_path / "s.npz"))
    exact = ns.BatchNormExact().update(x).result()
    ns.write_stats(exact, str(tmp_path / "e.npz"))
    ns.write_stats(ns.CentersExact(4).update(x, np.arange(40) % 4).result(), str(tmp_path / "c.npz"))
    ns.export_stats(exact, "torch", str(tmp_path / "bn.safetensors"))
    return tmp_path


FIT_BN = ["fit-bn", "x.npy", "--mode", "exact"]
FIT_C = ["fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", 4]
# (case, command with OUT where the colliding output goes, the input file it collides with)
COLLISIONS = [
    ("features", FIT_BN + ["-o", "OUT"], "x.npy"),
    ("labels", FIT_C + ["-o", "OUT"], "l.npy"),
    ("weights", FIT_BN + ["--weights", "w.npy", "-o", "OUT"], "w.npy"),
    ("groups", FIT_BN + ["--groups", "g.npy", "--num-groups", 2, "-o", "OUT"], "g.npy"),
    ("fit-bn-init", ["fit-bn", "x.npy", "--init", "e.npz", "-o", "OUT"], "e.npz"),
    ("fit-centers-init", FIT_C + ["--mode", "exact", "--init", "c.npz", "-o", "OUT"], "c.npz"),
    ("resume", FIT_BN + ["--resume", "e.npz", "-o", "OUT"], "e.npz"),
    ("checkpoint-is-labels", FIT_C + ["-o", "new.npz", "--checkpoint", "OUT"], "l.npy"),
    ("checkpoint-is-init", ["fit-bn", "x.npy", "--init", "e.npz", "-o", "new.npz", "--checkpoint", "OUT"], "e.npz"),
    ("apply-stats", ["apply", "s.npz", "x.npy", "-o", "OUT"], "s.npz"),
    ("apply-input", ["apply", "s.npz", "x.npy", "-o", "OUT"], "x.npy"),
    ("apply-gamma", ["apply", "s.npz", "x.npy", "--gamma", "gamma.npy", "-o", "OUT"], "gamma.npy"),
    ("apply-beta", ["apply", "s.npz", "x.npy", "--beta", "gamma.npy", "-o", "OUT"], "gamma.npy"),
    ("apply-groups", ["apply", "s.npz", "x.npy", "--groups", "g.npy", "-o", "OUT"], "g.npy"),
    ("merge", ["merge", "e.npz", "e.npz", "-o", "OUT"], "e.npz"),
    ("export-stats", ["export", "e.npz", "--to", "keras", "-o", "OUT"], "e.npz"),
    ("export-gamma", ["export", "e.npz", "--to", "torch", "--gamma", "bn.safetensors:weight", "-o", "OUT"],
     "bn.safetensors"),
    ("import", ["import", "bn.safetensors", "-o", "OUT"], "bn.safetensors"),
    ("assign-centers", ["assign", "c.npz", "x.npy", "-o", "OUT"], "c.npz"),
    ("inspect-plot", ["inspect", "s.npz", "--plot", "OUT"], "s.npz"),
]


@pytest.mark.parametrize("how", ["same-path", "symlink", "hardlink"])
@pytest.mark.parametrize("case, args, victim", COLLISIONS, ids=[c[0] for c in COLLISIONS])
def test_an_output_that_is_an_input_is_refused_even_with_force(run, made, case, args, victim, how):
    out = victim
    if how != "same-path":
        out = "alias" + os.path.splitext(victim)[1]
        (os.symlink if how == "symlink" else os.link)(victim, made / out)
    before = _snapshot(made)
    result = run(*[out if a == "OUT" else a for a in args], "--force")
    assert result.exit_code == 2, (result.output, result.exception)
    message = _error(result)
    assert "same file" in message and out in message and victim in message, message
    assert _snapshot(made) == before  # nothing written, nothing removed


def test_an_output_equal_to_the_checkpoint_is_refused_before_either_exists(run, made):
    (made / "sub").mkdir()
    os.symlink("sub", made / "via")
    for output, checkpoint in (("out.npz", "out.npz"), ("sub/o.npz", "via/o.npz")):
        result = run(*FIT_BN, "-o", output, "--checkpoint", checkpoint, "--checkpoint-every", 0, "--force")
        assert result.exit_code == 2
        assert "--checkpoint file" in _error(result) and "same file as the output" in _error(result)
        assert not (made / output).exists()


def test_a_checkpoint_may_be_the_file_it_resumes(run, made, monkeypatch):
    """README: --checkpoint ck --resume ck goes on from the last checkpoint and keeps saving there."""
    _interrupted_checkpoint(run, monkeypatch, *FIT_BN)
    assert (made / "ck.npz").exists()
    existing = run(*FIT_BN, "--batch-size", 8, "-o", "out.npz", "--checkpoint", "ck.npz")
    assert existing.exit_code == 2 and "--force" in _error(existing)  # an existing file is never taken silently
    done = run(*FIT_BN, "--batch-size", 8, "-o", "out.npz", "--checkpoint", "ck.npz", "--resume", "ck.npz")
    assert done.exit_code == 0, done.output
    np.testing.assert_allclose(np.load(made / "out.npz")["mean"], np.load(made / "x.npy").mean(axis=0), rtol=1e-12)
    assert not (made / "ck.npz").exists()


# --- the final step never replaces a file that appeared meanwhile --------------------------


def _appear_during_run(monkeypatch, path: Path, content: bytes) -> None:
    @contextlib.contextmanager
    def progress(total_rows, *, quiet, label, initial=0):
        def advance(rows):
            if not path.exists():
                path.write_bytes(content)
        yield advance
    monkeypatch.setattr(normstats.cli.commands, "progress_bar", progress)


@pytest.mark.parametrize("fallback", ["link", "renameat2", "look-then-rename"])
@pytest.mark.parametrize("command, out", [("fit-bn", "out.h5"), ("apply", "out.npy"), ("assign", "out.h5")])
def test_an_output_that_appears_meanwhile_is_kept(run, made, monkeypatch, command, out, fallback):
    if fallback != "link":  # a filesystem without hard links
        monkeypatch.setattr(normstats.writers.atomic.os, "link", _refuse_links)
    if fallback == "look-then-rename":  # ... and without renameat2
        monkeypatch.setattr(normstats.writers.atomic.ctypes, "CDLL", _no_library)
    _appear_during_run(monkeypatch, made / out, b"someone else's")
    args = {"fit-bn": FIT_BN, "apply": ["apply", "s.npz", "x.npy"], "assign": ["assign", "c.npz", "x.npy"]}[command]
    result = run(*args, "-o", out)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "created by someone else" in _error(result) and "--force" in _error(result)
    assert (made / out).read_bytes() == b"someone else's"
    assert not [p for p in made.iterdir() if p.name.endswith(".tmp")]
    (made / out).unlink()
    forced = made / f"forced{os.path.splitext(out)[1]}"
    _appear_during_run(monkeypatch, forced, b"replaced")
    assert run(*args, "-o", forced.name, "--force").exit_code == 0
    assert forced.read_bytes() != b"replaced" and forced.stat().st_size > 100


def _refuse_links(source, target, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted")


def _no_library(*args, **kwargs):
    raise OSError("no libc")


def test_the_library_replaces_by_default_and_keeps_with_replace_false(tmp_path):
    stats = ns.BatchNormExact().update(np.ones((4, 2))).result()
    path = tmp_path / "s.npz"
    path.write_bytes(b"old")
    with pytest.raises(ns.UsageError, match="created by someone else"):
        ns.write_stats(stats, str(path), replace=False)
    assert path.read_bytes() == b"old"
    ns.write_stats(stats, str(path))
    assert ns.read_stats(str(path)).meta["rows_seen"] == 4


# --- temporaries of dead writers ------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_run_removes_the_temporaries_of_dead_writers_only(run, made):
    dead, old = _dead_pid(), time.time() - 3600
    folder = made / "out"  # a folder this process has not written to yet (each is swept once)
    folder.mkdir()
    stale = folder / f".out.npz.{dead}.0badc0de.tmp"
    live = folder / f".out.npz.{os.getppid()}.0badc0de.tmp"  # the test runner's parent: alive
    fresh = folder / f".new.npz.{dead}.12345678.tmp"  # written after this run started: kept
    mine = folder / f".notes.{dead}.tmp"  # not our pattern
    for path in (stale, live, fresh, mine):
        path.write_bytes(b"partial")
    for path in (stale, live, mine):
        os.utime(path, (old, old))
    os.utime(fresh, (time.time() + 60, time.time() + 60))
    assert run(*FIT_BN, "-o", "out/out.npz").exit_code == 0
    assert not stale.exists()
    assert live.exists() and fresh.exists() and mine.exists()


def test_temporaries_carry_the_writers_pid(run, made, monkeypatch):
    seen = []
    real = normstats.writers.stats_h5._write_stats_h5

    def spy(arrays, meta, path):
        seen.append(os.path.basename(path))
        real(arrays, meta, path)
    monkeypatch.setattr(normstats.writers.stats_h5, "_write_stats_h5", spy)
    assert run(*FIT_BN, "-o", "o.h5").exit_code == 0
    match = normstats.writers.atomic.TEMPORARY.match(seen[0])
    assert match and match["base"] == "o.h5" and int(match["pid"]) == os.getpid()


def test_an_output_name_too_long_for_its_temporary_is_refused_before_the_work(run, made):
    name = "n" * 245 + ".npz"  # a legal name (249 bytes); its temporary is not
    result = run(*FIT_BN, "-o", name)
    assert result.exit_code == 2
    assert "too long" in _error(result) and "at most" in _error(result)
    assert not [p for p in made.iterdir() if p.name.startswith((".n", "n"))]


# --- checkpoints know their inputs ------------------------------------------------------


def _interrupted_checkpoint(run, monkeypatch, *args) -> None:
    monkeypatch.setattr(normstats.pipeline, "block_rows_for", lambda row_bytes, batch_size, **_: 8)
    calls = {"n": 0}

    @contextlib.contextmanager
    def interrupting(total_rows, *, quiet, label, initial=0):
        def advance(rows):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        yield advance
    with monkeypatch.context() as m:
        m.setattr(normstats.cli.commands, "progress_bar", interrupting)
        result = run(*args, "--batch-size", 8, "-o", "out.npz", "--checkpoint", "ck.npz", "--checkpoint-every", 0)
        assert result.exit_code == 130


@pytest.mark.parametrize("change", ["other-folder", "rewritten", "other-labels"])
def test_resume_over_other_files_of_the_same_names_is_refused(run, made, monkeypatch, change):
    args = ["fit-centers", "x.npy", "--labels", "l.npy", "--num-classes", 4, "--mode", "exact"]
    _interrupted_checkpoint(run, monkeypatch, *args)
    ckpt = ns.read_stats(str(made / "ck.npz")).meta["checkpoint"]
    assert [(i["role"], i["path"]) for i in ckpt["inputs"]] == [
        ("features", str(made / "x.npy")), ("labels", str(made / "l.npy"))]
    x = np.load(made / "x.npy")
    if change == "other-folder":  # same name, same length, other numbers
        (made / "b").mkdir()
        np.save(made / "b" / "x.npy", x + 1)
        args[1] = "b/x.npy"
        expected = "b/x.npy"
    elif change == "rewritten":
        np.save(made / "x.npy", np.vstack([x[:-1], x[-1:] + 1]))
        os.utime(made / "x.npy", ns=(0, 10**18))
        expected = "modified"
    else:
        (made / "b").mkdir()
        np.save(made / "b" / "l.npy", np.load(made / "l.npy")[::-1])
        args[3] = "b/l.npy"
        expected = "b/l.npy"
    result = run(*args, "-o", "out.npz", "--resume", "ck.npz")
    assert result.exit_code == 2, result.output
    message = _error(result)
    assert "other files" in message and expected in message, message
    assert not (made / "out.npz").exists() and (made / "ck.npz").exists()


def test_resume_over_the_same_files_goes_on(run, made, monkeypatch):
    args = [*FIT_BN, "--weights", "w.npy"]
    _interrupted_checkpoint(run, monkeypatch, *args)
    result = run(*args, "-o", "out.npz", "--resume", "ck.npz")
    assert result.exit_code == 0, result.output
    x, w = np.load(made / "x.npy"), np.load(made / "w.npy")
    np.testing.assert_allclose(np.load(made / "out.npz")["mean"], (w[:, None] * x).sum(0) / w.sum(), rtol=1e-12)


@pytest.mark.parametrize("how", ["same-path", "symlink", "hardlink"])
def test_merging_one_file_twice_is_refused(run, made, how):
    """Its rows would count twice (mean unchanged, counts and variance wrong)."""
    other = {"same-path": "e.npz", "symlink": "alias.npz", "hardlink": "twin.npz"}[how]
    if how == "symlink":
        os.symlink("e.npz", made / other)
    elif how == "hardlink":
        os.link(made / "e.npz", made / other)
    result = run("merge", "e.npz", other, "-o", "m.npz")
    assert result.exit_code == 2
    message = _error(result)
    assert "same file" in message and "count twice" in message
    assert not (made / "m.npz").exists()


@pytest.mark.parametrize("command", [FIT_BN + ["-o", "OUT.npz"], ["apply", "s.npz", "x.npy", "-o", "OUT.npy"]])
def test_force_never_replaces_a_fifo(run, made, command):
    target = [a for a in command if str(a).startswith("OUT")][0]
    os.mkfifo(made / target)
    result = run(*command, "--force")
    assert result.exit_code == 2
    assert "is a FIFO, not a file" in _error(result)
    assert (made / target).is_fifo()
