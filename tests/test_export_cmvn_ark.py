"""Kaldi and ESPnet1 CMVN exports: a global matrix as ``cmvn.ark`` (key ``global``),
per-speaker matrices as ESPnet's compute_cmvn_stats.py writes them (a Kaldi archive
or an HDF5 file, one 2 x (D+1) matrix per key; a global ``.npy``), against NumPy."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

kaldiio = pytest.importorskip("kaldiio")

# utterance -> (speaker, frames): speakers of one, two and two utterances, of unequal lengths
UTTERANCES = {"a1": ("spkA", 12), "b1": ("spkB", 4), "a2": ("spkA", 29), "c1": ("spkC", 7), "b2": ("spkB", 18)}
SPEAKERS = {utt: speaker for utt, (speaker, _) in UTTERANCES.items()}


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, np.ndarray]:
    """The utterances of 3-d features in feats.ark / feats.scp, and their utt2spk."""
    rng = np.random.default_rng(2)
    scales = np.array([1.0, 4.0, 0.5])
    utts = {utt: (rng.normal(size=(frames, 3)) * scales + ord(speaker[-1])).astype(np.float32)
            for utt, (speaker, frames) in UTTERANCES.items()}
    kaldiio.save_ark(str(tmp_path / "feats.ark"), utts, scp=str(tmp_path / "feats.scp"))
    with open(tmp_path / "utt2spk", "w") as f:
        f.writelines(f"{utt} {speaker}\n" for utt, speaker in SPEAKERS.items())
    return utts


def _cmvn(frames: np.ndarray) -> np.ndarray:
    """Kaldi's 2 x (D+1) CMVN matrix of `frames`, by NumPy."""
    x = frames.astype(np.float64)
    out = np.zeros((2, x.shape[1] + 1))
    out[0, :-1], out[0, -1], out[1, :-1] = x.sum(0), len(x), (x ** 2).sum(0)
    return out


def _per_speaker(corpus: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {s: _cmvn(np.concatenate([corpus[u] for u, t in SPEAKERS.items() if t == s]))
            for s in sorted(set(SPEAKERS.values()))}


def _fit(run, *args: str) -> None:
    result = run("fit-bn", "scp:feats.scp", "--mode", "exact", "-q", *args)
    assert result.exit_code == 0, result.stderr


def test_a_global_matrix_as_cmvn_ark(run, corpus, tmp_path: Path) -> None:
    _fit(run, "-o", "g.npz")
    result = run("export", "g.npz", "--to", "kaldi", "-o", "cmvn.ark")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith(", key 'global' -> cmvn.ark\n")
    entries = dict(kaldiio.load_ark(str(tmp_path / "cmvn.ark")))
    assert list(entries) == ["global"]
    np.testing.assert_allclose(entries["global"], _cmvn(np.concatenate(list(corpus.values()))), rtol=1e-12)
    assert run("export", "g.npz", "--to", "kaldi", "-o", "cmvn.mat").exit_code == 0
    np.testing.assert_array_equal(kaldiio.load_mat(str(tmp_path / "cmvn.mat")), entries["global"])


@pytest.mark.parametrize("output", ["cmvn.ark", "cmvn.h5"])
def test_espnet1_per_speaker_cmvn(run, corpus, tmp_path: Path, output: str) -> None:
    _fit(run, "--groups", "utt2spk=utt2spk", "-o", "spk.npz")
    result = run("export", "spk.npz", "--to", "espnet", "-o", output)
    assert result.exit_code == 0, result.stderr
    assert "ESPnet1 CMVN stats 2 x 4 for 3 groups" in result.stdout
    if output.endswith(".ark"):
        written = dict(kaldiio.load_ark(str(tmp_path / output)))
    else:
        with h5py.File(tmp_path / output) as f:
            assert not f.attrs.keys()  # nothing but the matrices, as ESPnet's HDF5 writer leaves it
            written = {key: f[key][()] for key in f}
    expected = _per_speaker(corpus)
    assert list(written) == list(expected)
    for speaker, matrix in expected.items():
        assert written[speaker].dtype == np.float64 and written[speaker].shape == (2, 4)
        np.testing.assert_allclose(written[speaker], matrix, rtol=1e-12)
        # what ESPnet's loader derives from it: mean and std per dimension
        count = written[speaker][0, -1]
        mean = written[speaker][0, :-1] / count
        frames = np.concatenate([corpus[u] for u, t in SPEAKERS.items() if t == speaker]).astype(np.float64)
        np.testing.assert_allclose(mean, frames.mean(0), rtol=1e-10)


def test_espnet1_global_npy(run, corpus, tmp_path: Path) -> None:
    _fit(run, "-o", "g.npz")
    result = run("export", "g.npz", "--to", "espnet", "-o", "cmvn.npy")
    assert result.exit_code == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "cmvn.npy"), _cmvn(np.concatenate(list(corpus.values()))),
                               rtol=1e-12)


@pytest.mark.parametrize("stats, output, words", [
    ("spk.npz", "cmvn.npy", "only global ones to .npy"),
    ("g.npz", "cmvn.h5", "only per-group ones to HDF5"),
    ("spk.npz", "cmvn.mat", "write cmvn.ark"),
    ("g.npz", "cmvn.txt", "must end in one of .npz, .npy, .ark, .h5, .hdf5"),
])
def test_layouts_espnet_never_writes_are_refused(run, corpus, tmp_path: Path, stats: str, output: str,
                                                 words: str) -> None:
    _fit(run, "-o", "g.npz")
    _fit(run, "--groups", "utt2spk=utt2spk", "-o", "spk.npz")
    target = "kaldi" if output.endswith(".mat") else "espnet"
    result = run("export", stats, "--to", target, "-o", output)
    assert result.exit_code == 2 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert words in result.stderr, result.stderr
    assert not (tmp_path / output).exists()
