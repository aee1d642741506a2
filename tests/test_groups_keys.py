"""Per-utterance and per-speaker statistics from a collection's keys: --groups
utterance / utt2spk=FILE / spk2utt=FILE, group names stored and used by the
Kaldi export, against plain NumPy."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns
from normstats.cli.report import too_small_groups

kaldiio = pytest.importorskip("kaldiio")

SPEAKERS = {"utt0": "spkB", "utt1": "spkA", "utt2": "spkB", "utt3": "spkC", "utt4": "spkA"}


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    utts = {key: (rng.normal(size=(int(rng.integers(3, 20)), 4)) * (i + 1) + 10 * i).astype(np.float32)
            for i, key in enumerate(SPEAKERS)}
    kaldiio.save_ark(str(tmp_path / "feats.ark"), utts, scp=str(tmp_path / "feats.scp"))
    (tmp_path / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s in SPEAKERS.items()))
    spk2utt = {}
    for u, s in SPEAKERS.items():
        spk2utt.setdefault(s, []).append(u)
    (tmp_path / "spk2utt").write_text("".join(f"{s} {' '.join(us)}\n" for s, us in sorted(spk2utt.items())))
    return utts


def _fit(run, *args) -> ns.Stats:
    result = run("fit-bn", *args, "-o", "s.npz", "--mode", "exact", "-q")
    assert result.exit_code == 0, result.stderr
    return ns.read_stats("s.npz")


def test_groups_utterance(run, corpus) -> None:
    stats = _fit(run, "scp:feats.scp", "--groups", "utterance")
    assert stats.meta["group_names"] == list(corpus) and stats.meta["groups"] == len(corpus)
    for g, x in enumerate(corpus.values()):
        np.testing.assert_allclose(stats.arrays["mean"][g], x.astype(np.float64).mean(0), rtol=1e-10)
        np.testing.assert_allclose(stats.arrays["var"][g], x.astype(np.float64).var(0, ddof=1), rtol=1e-10)


@pytest.mark.parametrize("option", ["utt2spk=utt2spk", "spk2utt=spk2utt"])
def test_groups_per_speaker_and_kaldi_export_keyed_by_speaker(run, corpus, option: str, tmp_path: Path) -> None:
    stats = _fit(run, "scp:feats.scp", "--groups", option, "--ddof", "0")
    speakers = sorted(set(SPEAKERS.values()))
    assert stats.meta["group_names"] == speakers
    for g, speaker in enumerate(speakers):
        x = np.concatenate([corpus[u] for u, s in SPEAKERS.items() if s == speaker]).astype(np.float64)
        np.testing.assert_allclose(stats.arrays["mean"][g], x.mean(0), rtol=1e-10)
        np.testing.assert_allclose(stats.arrays["var"][g], x.var(0), rtol=1e-10)
    result = run("export", "s.npz", "-o", "cmvn.ark", "--to", "kaldi")
    assert result.exit_code == 0, result.stderr
    cmvn = dict(kaldiio.load_ark(str(tmp_path / "cmvn.ark")))
    assert sorted(cmvn) == speakers
    for speaker in speakers:
        x = np.concatenate([corpus[u] for u, s in SPEAKERS.items() if s == speaker]).astype(np.float64)
        np.testing.assert_allclose(cmvn[speaker][0, :-1], x.sum(0), rtol=1e-9)
        assert cmvn[speaker][0, -1] == len(x)
        np.testing.assert_allclose(cmvn[speaker][1, :-1], (x ** 2).sum(0), rtol=1e-9)


def test_group_names_round_trip_every_stats_format(run, corpus, tmp_path: Path) -> None:
    for suffix in (".npz", ".h5", ".json", ".safetensors"):
        result = run("fit-bn", "scp:feats.scp", "--groups", "utterance", "--mode", "exact", "-q",
                     "-o", f"s{suffix}")
        assert result.exit_code == 0, result.stderr
        assert ns.read_stats(tmp_path / f"s{suffix}").meta["group_names"] == list(corpus)


def test_hdf5_collection_per_utterance(run, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    utts = {f"u{i}": rng.normal(size=(5 + i, 3)) for i in range(4)}
    with h5py.File(tmp_path / "f.h5", "w") as f:
        for key, value in utts.items():
            f[f"feats/{key}"] = value
    stats = _fit(run, "f.h5:/feats", "--groups", "utterance")
    assert stats.meta["group_names"] == sorted(utts)
    for g, key in enumerate(sorted(utts)):
        np.testing.assert_allclose(stats.arrays["mean"][g], utts[key].mean(0), rtol=1e-10)


def test_key_group_errors_are_one_line(run, corpus, tmp_path: Path) -> None:
    (tmp_path / "partial").write_text("utt0 spkA\n")
    np.save(tmp_path / "x.npy", np.ones((4, 2)))
    cases = [
        (["scp:feats.scp", "--groups", "utt2spk=partial"], "utterance 'utt1' is not in partial"),
        (["x.npy", "--groups", "utterance"], "without sequence keys"),
        (["scp:feats.scp", "--groups", "utterance", "--num-groups", "3"], "makes 5 groups, not --num-groups 3"),
        (["scp:feats.scp", "--groups", "utt2spk="], "name the Kaldi utt2spk file"),
        (["scp:feats.scp", "--groups", "utterance", "--jobs", "2"], "--jobs 1 for now"),
    ]
    for args, message in cases:
        result = run("fit-bn", *args, "-o", "s.npz", "--mode", "exact")
        assert result.exit_code != 0 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.npz").exists()


def test_bad_group_names_in_a_stats_file_are_refused(tmp_path: Path) -> None:
    stats = ns.BatchNormExact(num_groups=2).update(np.arange(8.0).reshape(4, 2), groups=np.array([0, 0, 1, 1])).result()
    stats.meta["group_names"] = ["a", 3]
    ns.write_stats(stats, tmp_path / "s.json")
    with pytest.raises(ns.StatsFileError, match="group_names"):
        ns.read_stats(tmp_path / "s.json")


def test_too_small_groups_are_reported_by_key() -> None:
    meta = {"groups_too_small": 2, "groups_too_small_list": [1, 3], "group_names": ["a", "b", "c", "d"], "ddof": 1}
    assert too_small_groups(meta) == "2 groups with <= ddof=1 frames (var NaN): 'b', 'd'"
    assert too_small_groups({"groups_too_small": 3, "groups_too_small_list": [0], "ddof": 0}) == \
        "3 groups with <= ddof=0 frames (var NaN): 0 and 2 more"
    assert too_small_groups({"groups_unseen": 1}) == ""


def test_a_sequence_shorter_than_ddof_plus_one_is_named(run, tmp_path: Path) -> None:
    """Whether the fit stops or reports such groups, the report names the key."""
    utts = {"long": np.arange(15, dtype=np.float32).reshape(5, 3), "short": np.ones((1, 3), np.float32)}
    kaldiio.save_ark(str(tmp_path / "f.ark"), utts, scp=str(tmp_path / "f.scp"))
    result = run("fit-bn", "scp:f.scp", "--groups", "utterance", "--mode", "exact", "-o", "s.npz", "-q")
    said = (result.stdout + result.stderr).strip().splitlines()
    assert len(said) == 1 and "'short'" in said[0] and "ddof=1" in said[0] and "'long'" not in said[0]
    assert run("fit-bn", "scp:f.scp", "--groups", "utterance", "--mode", "exact", "-o", "s0.npz",
               "--ddof", "0", "-q").exit_code == 0


def test_apply_per_speaker_by_key_equals_numpy(run, corpus, tmp_path: Path) -> None:
    _fit(run, "scp:feats.scp", "--groups", "utt2spk=utt2spk")
    result = run("apply", "s.npz", "scp:feats.scp", "--groups", "utt2spk=utt2spk", "-o", "out.npy", "-q")
    assert result.exit_code == 0, result.stderr
    stats = ns.read_stats(tmp_path / "s.npz")
    names = stats.meta["group_names"]
    expected = np.concatenate([
        (x.astype(np.float64) - stats.arrays["mean"][names.index(SPEAKERS[u])]) * stats.arrays["inv_std"][names.index(SPEAKERS[u])]
        for u, x in corpus.items()])
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-5)
    (tmp_path / "s.npz").unlink()
    _fit(run, "scp:feats.scp")
    result = run("apply", "s.npz", "scp:feats.scp", "--groups", "utterance", "-o", "out2.npy")
    assert result.exit_code == 2 and "holds no group names" in result.stderr


def test_keys_span_shards_and_must_be_unique(run, corpus, tmp_path: Path) -> None:
    names = list(corpus)
    kaldiio.save_ark(str(tmp_path / "a.ark"), {k: corpus[k] for k in names[:2]}, scp=str(tmp_path / "a.scp"))
    kaldiio.save_ark(str(tmp_path / "b.ark"), {k: corpus[k] for k in names[2:]}, scp=str(tmp_path / "b.scp"))
    stats = _fit(run, "scp:a.scp", "scp:b.scp", "--groups", "utterance")
    assert stats.meta["group_names"] == names
    for g, key in enumerate(names):
        np.testing.assert_allclose(stats.arrays["mean"][g], corpus[key].astype(np.float64).mean(0), rtol=1e-10)
    result = run("fit-bn", "scp:a.scp", "scp:a.scp", "--groups", "utterance", "--mode", "exact", "-o", "t.npz")
    assert result.exit_code == 1 and "'utt0' appears in two input shards" in result.stderr
    result = run("fit-bn", "scp:a.scp", "--dataset", "x", "-o", "t.npz")
    assert result.exit_code == 2 and "leave out --dataset" in result.stderr
