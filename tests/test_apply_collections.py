"""apply over sequence collections: Kaldi ``scp:`` / ``ark:`` and HDF5 groups in,
``ark,scp:`` and ``OUT.h5:/GROUP`` out, statistics chosen by key, against plain NumPy
per utterance (read back with kaldiio and h5py), and the one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats.writers.kaldi_ark

kaldiio = pytest.importorskip("kaldiio")

SPEAKERS = {"utt0": "spkB", "utt1": "spkA", "utt2": "spkB", "utt3": "spkC", "utt4": "spkA", "utt5": "spkC"}
EPS = 1e-5


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, np.ndarray]:
    """Six utterances of 4-d features (one of a single frame), an scp, an utt2spk."""
    rng = np.random.default_rng(11)
    lengths = [17, 3, 40, 1, 9, 25]
    utts = {key: (rng.normal(size=(n, 4)) * (i + 1) + 10 * i).astype(np.float32)
            for i, (key, n) in enumerate(zip(SPEAKERS, lengths))}
    kaldiio.save_ark(str(tmp_path / "feats.ark"), utts, scp=str(tmp_path / "feats.scp"))
    (tmp_path / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s in SPEAKERS.items()))
    return utts


def _fit(run, *args: str, out: str = "s.npz") -> None:
    result = run("fit-bn", *args, "-o", out, "--mode", "exact", "-q")
    assert result.exit_code == 0, result.stderr


def _normalized(x: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """`x` normalized with the exact statistics (ddof 1) of `frames`, in float64."""
    frames = frames.astype(np.float64)
    return (x.astype(np.float64) - frames.mean(0)) / np.sqrt(frames.var(0, ddof=1) + EPS)


def _per_speaker(corpus: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    frames = {s: np.concatenate([corpus[u] for u, t in SPEAKERS.items() if t == s]) for s in set(SPEAKERS.values())}
    return {u: _normalized(x, frames[SPEAKERS[u]]) for u, x in corpus.items()}


def _temporaries(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_per_speaker_scp_to_ark_scp_equals_numpy(run, corpus, tmp_path: Path) -> None:
    _fit(run, "scp:feats.scp", "--groups", "utt2spk=utt2spk")
    result = run("apply", "s.npz", "scp:feats.scp", "--groups", "utt2spk=utt2spk", "-o", "ark,scp:out.ark,out.scp")
    assert result.exit_code == 0, result.stderr
    assert "-> ark,scp:out.ark,out.scp" in result.stdout
    lines = (tmp_path / "out.scp").read_text().splitlines()
    assert [line.split()[0] for line in lines] == list(corpus)  # the keys, in the input's order
    assert all(line.split()[1].startswith("out.ark:") for line in lines)  # the final archive, not a temporary
    written = dict(kaldiio.load_scp(str(tmp_path / "out.scp")))
    expected = _per_speaker(corpus)
    for key, x in corpus.items():
        assert written[key].dtype == np.float32 and written[key].shape == x.shape
        np.testing.assert_allclose(written[key], expected[key], rtol=1e-5, atol=1e-5)
    # the archive alone holds the same matrices under the same keys
    assert list(dict(kaldiio.load_ark(str(tmp_path / "out.ark")))) == list(corpus)
    assert _temporaries(tmp_path) == []


def test_per_utterance_ark_to_ark_without_scp(run, corpus, tmp_path: Path) -> None:
    long = {k: x for k, x in corpus.items() if len(x) > 1}  # a variance needs 2 frames (ddof 1)
    kaldiio.save_ark(str(tmp_path / "long.ark"), long)
    _fit(run, "ark:long.ark", "--groups", "utterance")
    result = run("apply", "s.npz", "ark:long.ark", "--groups", "utterance", "-o", "ark:out.ark", "-q")
    assert result.exit_code == 0, result.stderr
    written = dict(kaldiio.load_ark(str(tmp_path / "out.ark")))
    assert list(written) == list(long)
    for key, x in long.items():
        np.testing.assert_allclose(written[key], _normalized(x, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
def test_global_scp_to_hdf5_collection_and_back(run, corpus, tmp_path: Path, compression) -> None:
    _fit(run, "scp:feats.scp")
    extra = ["--compression", compression] if compression else []
    result = run("apply", "s.npz", "scp:feats.scp", "-o", "out.h5:/", *extra, "-q")
    assert result.exit_code == 0, result.stderr
    everything = np.concatenate(list(corpus.values()))
    with h5py.File(tmp_path / "out.h5") as f:
        assert sorted(f) == sorted(corpus)
        for key, x in corpus.items():
            dataset = f[key]
            assert dataset.compression == compression and (dataset.chunks is None) == (compression is None)
            np.testing.assert_allclose(dataset[()], _normalized(x, everything), rtol=1e-5, atol=1e-5)
    # the collection written reads back as one: the same frames under the same (sorted) keys
    result = run("apply", "s.npz", "out.h5:/", "-o", "again.ark", "-q")
    assert result.exit_code == 2  # .ark alone is not an array output
    result = run("apply", "s.npz", "out.h5:/", "-o", "ark:again.ark", "-q")
    assert result.exit_code == 0, result.stderr
    assert list(dict(kaldiio.load_ark(str(tmp_path / "again.ark")))) == sorted(corpus)


def test_hdf5_collection_keeps_keys_and_group_layout(run, corpus, tmp_path: Path) -> None:
    with h5py.File(tmp_path / "in.h5", "w") as f:
        for u, x in corpus.items():
            f[f"train/{SPEAKERS[u]}/{u}"] = x
        f["other"] = np.zeros((3, 4), np.float32)  # outside the group: neither read nor written
    keys = sorted(f"{SPEAKERS[u]}/{u}" for u in corpus)
    (tmp_path / "map").write_text("".join(f"{SPEAKERS[u]}/{u} {SPEAKERS[u]}\n" for u in corpus))
    _fit(run, "in.h5:/train", "--groups", "utt2spk=map")
    result = run("apply", "s.npz", "in.h5:/train", "--groups", "utt2spk=map", "-o", "out.h5:/train",
                 "--compression", "gzip", "-q")
    assert result.exit_code == 0, result.stderr
    expected = _per_speaker(corpus)
    with h5py.File(tmp_path / "out.h5") as f:
        assert list(f) == ["train"] and sorted(f["train"]) == sorted(set(SPEAKERS.values()))
        found = []
        f["train"].visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert sorted(found) == keys
        for u in corpus:
            np.testing.assert_allclose(f[f"train/{SPEAKERS[u]}/{u}"][()], expected[u], rtol=1e-5, atol=1e-5)


def test_a_sequence_spanning_read_blocks(run, corpus, tmp_path: Path, monkeypatch) -> None:
    """Blocks of 7 rows cut most utterances; each is still written whole, once."""
    import normstats.apply_collections as module

    monkeypatch.setattr(module, "block_rows_for", lambda row_bytes, batch_size, **_: 7)
    _fit(run, "scp:feats.scp")
    for out, read in [("ark:o.ark", lambda: dict(kaldiio.load_ark(str(tmp_path / "o.ark")))),
                      ("o.h5:/", lambda: {k: v[()] for k, v in h5py.File(tmp_path / "o.h5").items()})]:
        result = run("apply", "s.npz", "scp:feats.scp", "-o", out, "-q")
        assert result.exit_code == 0, result.stderr
        written, everything = read(), np.concatenate(list(corpus.values()))
        assert sorted(written) == sorted(corpus)
        for key, x in corpus.items():
            np.testing.assert_allclose(written[key], _normalized(x, everything), rtol=1e-5, atol=1e-5)


def test_an_hdf5_collection_output_is_fed_small_blocks(run, corpus, tmp_path: Path, monkeypatch) -> None:
    """The output decides the read block: an HDF5 group (whose own metadata takes tens of MB)
    2 MB, a Kaldi archive the usual ones; the output is the same whatever the block."""
    import normstats.apply_collections as module
    from normstats.writers.collections import CollectionOutput, collection_output

    assert collection_output("o.h5:/").block_bytes == 2 << 20
    assert collection_output("ark:o.ark").block_bytes is None

    seen = []
    blocks = module.normalized_blocks

    def spied(normalizer, stream, side, block_rows):
        seen.append(block_rows * stream.row_bytes)
        return blocks(normalizer, stream, side, block_rows)

    monkeypatch.setattr(CollectionOutput, "block_bytes", property(lambda self: 256))  # a few rows per block
    monkeypatch.setattr(module, "normalized_blocks", spied)
    _fit(run, "scp:feats.scp")
    result = run("apply", "s.npz", "scp:feats.scp", "-o", "ark:o.ark", "-q")
    assert result.exit_code == 0, result.stderr
    assert seen and seen[0] <= 256
    written, everything = dict(kaldiio.load_ark(str(tmp_path / "o.ark"))), np.concatenate(list(corpus.values()))
    for key, x in corpus.items():
        np.testing.assert_allclose(written[key], _normalized(x, everything), rtol=1e-5, atol=1e-5)


def test_compressed_array_output_equals_the_contiguous_one(run, tmp_path: Path) -> None:
    x = np.random.default_rng(3).normal(size=(1000, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    _fit(run, "x.npy")
    assert run("apply", "s.npz", "x.npy", "-o", "plain.h5:y", "-q").exit_code == 0
    result = run("apply", "s.npz", "x.npy", "-o", "packed.h5:y", "--compression", "gzip", "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(tmp_path / "plain.h5") as plain, h5py.File(tmp_path / "packed.h5") as packed:
        assert packed["y"].compression == "gzip" and packed["y"].chunks is not None
        assert plain["y"].chunks is None
        np.testing.assert_array_equal(packed["y"][()], plain["y"][()])
        np.testing.assert_allclose(packed["y"][()], _normalized(x, x), rtol=1e-5, atol=1e-5)


def test_a_key_missing_from_the_stats_is_one_error_naming_it(run, corpus, tmp_path: Path) -> None:
    some = {k: x for k, x in corpus.items() if k != "utt4" and len(x) > 1}
    kaldiio.save_ark(str(tmp_path / "some.ark"), some)
    _fit(run, "ark:some.ark", "--groups", "utterance")
    long = {k: x for k, x in corpus.items() if len(x) > 1}
    kaldiio.save_ark(str(tmp_path / "long.ark"), long)
    result = run("apply", "s.npz", "ark:long.ark", "--groups", "utterance", "-o", "ark,scp:o.ark,o.scp")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ") and "'utt4'" in result.stderr
    assert not (tmp_path / "o.ark").exists() and not (tmp_path / "o.scp").exists()


@pytest.mark.parametrize("output, words", [
    ("ark,t:o.ark", "text archives"),
    ("scp:o.scp", "with its archive"),
    ("ark,scp:o.ark", "needs 2 file name"),
    ("ark,x:o.ark", "unknown or repeated option 'x'"),
    ("ark:|gzip>o.ark", "pipes and standard output"),
    ("ark:-", "pipes and standard output"),
    ("ark:o.txt", "must end in one of .ark"),
    ("ark,scp:o.ark,o.txt", "must end in one of .scp"),
    ("ark,scp:o.ark,feats.scp", "same file as the input"),
    ("ark,scp:o.ark,o.ark", "same file as the output"),
    ("o.npy --compression gzip", "--compression is for HDF5 outputs"),
    ("ark:o.ark --compression lzf", "--compression is for HDF5 outputs"),
    ("o.h5:/ --compression zstd", "Invalid value for '--compression'"),
])
def test_bad_output_specs_are_one_line_errors(run, corpus, tmp_path: Path, output: str, words: str) -> None:
    _fit(run, "scp:feats.scp")
    before = sorted(os.listdir(tmp_path))
    result = run("apply", "s.npz", "scp:feats.scp", "-o", *output.split(" "))
    assert result.exit_code == 2, result.stdout
    assert words in result.stderr, result.stderr
    # ours are one line; click's own (an unknown --compression) come with its usage line
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1 or "Usage:" in result.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_the_archive_an_scp_reads_is_never_an_output(run, corpus, tmp_path: Path) -> None:
    _fit(run, "scp:feats.scp")
    before = (tmp_path / "feats.ark").read_bytes()
    result = run("apply", "s.npz", "scp:feats.scp", "-o", "ark,scp:feats.ark,o.scp", "--force")
    assert result.exit_code == 2
    assert "feats.ark" in result.stderr and "which the input scp:feats.scp reads" in result.stderr
    assert (tmp_path / "feats.ark").read_bytes() == before and not (tmp_path / "o.scp").exists()


def test_an_input_without_keys_is_refused_an_archive(run, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((5, 4), np.float32))
    _fit(run, "x.npy")
    result = run("apply", "s.npz", "x.npy", "-o", "ark:o.ark")
    assert result.exit_code == 2 and "keeps the input's keys, and x.npy has none" in result.stderr
    # an HDF5 group path names a dataset for an input without keys, as it always did
    assert run("apply", "s.npz", "x.npy", "-o", "o.h5:/g/x", "-q").exit_code == 0
    with h5py.File(tmp_path / "o.h5") as f:
        assert f["g/x"].shape == (5, 4)


def test_kaldi_needs_matrices_of_float32_or_float64(run, corpus, tmp_path: Path) -> None:
    _fit(run, "scp:feats.scp")
    result = run("apply", "s.npz", "scp:feats.scp", "-o", "ark:o.ark", "--dtype", "float16")
    assert result.exit_code == 2 and "pass --dtype float32" in result.stderr
    result = run("apply", "s.npz", "scp:feats.scp", "-o", "o.h5:/", "--dtype", "float16", "-q")
    assert result.exit_code == 0, result.stderr  # HDF5 holds float16


def test_interrupted_midway_leaves_neither_ark_nor_scp(run, corpus, tmp_path: Path, monkeypatch) -> None:
    _fit(run, "scp:feats.scp")
    real, calls = normstats.writers.kaldi_ark.KaldiArkWriter._save, []

    def save(self, index, matrix):
        real(self, index, matrix)  # two matrices really reach the temporaries
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(normstats.writers.kaldi_ark.KaldiArkWriter, "_save", save)
    result = run("apply", "s.npz", "scp:feats.scp", "-o", "ark,scp:o.ark,o.scp", "-q")
    assert result.exit_code != 0 and len(calls) == 2
    assert not (tmp_path / "o.ark").exists() and not (tmp_path / "o.scp").exists()
    assert _temporaries(tmp_path) == []


def test_the_scp_placement_failing_takes_the_ark_back(run, corpus, tmp_path: Path) -> None:
    """The set is all or nothing: an scp that cannot be placed removes the ark placed before it."""
    _fit(run, "scp:feats.scp")
    import normstats.writers.atomic as atomic

    with pytest.MonkeyPatch.context() as patch:
        real = atomic._place

        def place(temporary, path, replace):
            if path.endswith(".scp"):
                (tmp_path / "o.scp").write_text("someone else's")  # appeared meanwhile
            real(temporary, path, replace)
        patch.setattr(atomic, "_place", place)
        result = run("apply", "s.npz", "scp:feats.scp", "-o", "ark,scp:o.ark,o.scp", "-q")
    assert result.exit_code == 2 and "was created by someone else" in result.stderr
    assert not (tmp_path / "o.ark").exists() and (tmp_path / "o.scp").read_text() == "someone else's"
    assert _temporaries(tmp_path) == []


FULL_CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys
    from click.testing import CliRunner
    from normstats.cli import cli
    os.chdir(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the console script does
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
    result = CliRunner().invoke(cli, ["apply", "s.npz", "scp:feats.scp", "-q", "-o", *sys.argv[3:]])
    print(result.exit_code)
    print(result.stderr if hasattr(result, "stderr") else result.output)
    """
)


@pytest.mark.parametrize("output", ["ark,scp:o.ark,o.scp", "o.h5:/", "o.h5:/ --compression gzip",
                                    "o.h5:/ --compression lzf", "o.h5 --compression gzip"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, output: str) -> None:
    rng = np.random.default_rng(0)
    utts = {f"u{i:03d}": rng.normal(size=(200, 40)).astype(np.float32) for i in range(40)}
    kaldiio.save_ark(str(tmp_path / "feats.ark"), utts, scp=str(tmp_path / "feats.scp"))
    from click.testing import CliRunner

    from normstats.cli import cli

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert CliRunner().invoke(cli, ["fit-bn", "scp:feats.scp", "--mode", "exact", "-q", "-o", "s.npz"]).exit_code == 0
    finally:
        os.chdir(cwd)
    limit = 200_000  # bytes; every output is over 1 MB, compressed too (normal noise hardly compresses)
    child = subprocess.run([sys.executable, "-c", FULL_CHILD, str(tmp_path), str(limit), *output.split(" ")],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]  # no SIGSEGV, no traceback
    code, message = child.stdout.split("\n", 1)
    assert code == "1", child.stdout
    assert message.strip().count("\n") == 0 and message.startswith("Error: cannot write o.")
    assert "file-size limit" in message and "no output was left" in message
    assert sorted(os.listdir(tmp_path)) == ["feats.ark", "feats.scp", "s.npz"]




@pytest.mark.parametrize("output", [["ark:o.ark"], ["o.h5:/"], ["o.h5", "--compression", "gzip"]])
def test_collection_and_compressed_outputs_run_on_the_local_engine(run, corpus, tmp_path: Path, output) -> None:
    _fit(run, "scp:feats.scp")
    result = run("apply", "s.npz", "scp:feats.scp", "--engine", "dask", "-o", *output)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "runs on the local engine for now; leave out --engine dask" in result.stderr
    assert _temporaries(tmp_path) == [] and not list(tmp_path.glob("o.*"))
