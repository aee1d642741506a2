"""Sequence collections as one input: Kaldi scp/ark and HDF5 groups / globs,
against the frames concatenated in order with plain NumPy."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns

kaldiio = pytest.importorskip("kaldiio")


def _utterances(count: int = 7, dims: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"utt{i:02d}": (rng.normal(size=(int(rng.integers(1, 30)), dims)) * (i + 1) + i).astype(np.float32)
            for i in range(count)}


def _read_all(spec: str, block_rows: int = 4) -> tuple[np.ndarray, ns.Stream]:
    with ns.open_stream([spec]) as stream:
        data = np.concatenate([block.copy() for block in stream.blocks(block_rows, prefetch=False)])
        return data, stream


@pytest.mark.parametrize("compression", [None, 2, 3, 1])  # kaldiio: 1 = CM, 2 = CM2, 3 = CM3
def test_scp_and_ark_read_every_frame_in_order(tmp_path: Path, compression) -> None:
    utts = _utterances()
    ark, scp = tmp_path / "feats.ark", tmp_path / "feats.scp"
    kaldiio.save_ark(str(ark), utts, scp=str(scp), compression_method=compression)
    expected = np.concatenate(list(kaldiio.load_scp(str(scp)).values())
                              if compression else list(utts.values()))
    for spec in (f"scp:{scp}", str(scp), f"ark:{ark}", str(ark), f"ark,s,cs:{ark}"):
        data, stream = _read_all(spec)
        np.testing.assert_array_equal(data, expected)
        source = stream.sources[0]
        assert source.keys == list(utts)
        assert list(source.lengths) == [len(v) for v in utts.values()]


def test_scp_order_is_the_scp_order_and_may_span_archives(tmp_path: Path) -> None:
    utts = _utterances(6)
    names = list(utts)
    kaldiio.save_ark(str(tmp_path / "a.ark"), {k: utts[k] for k in names[:3]}, scp=str(tmp_path / "a.scp"))
    kaldiio.save_ark(str(tmp_path / "b.ark"), {k: utts[k] for k in names[3:]}, scp=str(tmp_path / "b.scp"))
    lines = (tmp_path / "a.scp").read_text().splitlines() + (tmp_path / "b.scp").read_text().splitlines()
    (tmp_path / "all.scp").write_text("\n".join(reversed(lines)) + "\n")
    data, stream = _read_all(f"scp:{tmp_path / 'all.scp'}", block_rows=7)
    np.testing.assert_array_equal(data, np.concatenate([utts[k] for k in reversed(names)]))
    assert stream.sources[0].keys == list(reversed(names))


def test_kaldi_fit_equals_numpy(tmp_path: Path) -> None:
    utts = _utterances(dims=3)
    kaldiio.save_ark(str(tmp_path / "f.ark"), utts, scp=str(tmp_path / "f.scp"))
    x = np.concatenate(list(utts.values())).astype(np.float64)
    with ns.open_stream([f"scp:{tmp_path / 'f.scp'}"]) as stream:
        stats = ns.run_fit(ns.BatchNormExact(), stream, block_rows=5)
    np.testing.assert_allclose(stats.arrays["mean"], x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats.arrays["var"], x.var(0, ddof=1), rtol=1e-10)


def test_collection_larger_than_many_blocks_reads_with_small_blocks(tmp_path: Path) -> None:
    """Memory bounded by the block: 200 utterances read 16 rows at a time, one matrix held at a time."""
    utts = _utterances(200, dims=4, seed=3)
    kaldiio.save_ark(str(tmp_path / "f.ark"), utts, scp=str(tmp_path / "f.scp"))
    with ns.open_stream([f"scp:{tmp_path / 'f.scp'}"]) as stream:
        source = stream.sources[0]
        total = 0.0
        for block in stream.blocks(16, prefetch=False):
            assert block.shape[0] <= 16
            total += float(block.astype(np.float64).sum())
            cached = source._cached
            assert cached is None or cached[1].shape[0] == source.lengths[cached[0]]
    assert total == pytest.approx(sum(float(v.astype(np.float64).sum()) for v in utts.values()), rel=1e-9)


def test_damaged_archives_name_the_utterance(tmp_path: Path, run) -> None:
    utts = _utterances(3)
    kaldiio.save_ark(str(tmp_path / "f.ark"), utts, scp=str(tmp_path / "f.scp"))
    raw = (tmp_path / "f.ark").read_bytes()
    (tmp_path / "cut.ark").write_bytes(raw[: len(raw) - 10])
    result = run("fit-bn", "ark:cut.ark", "-o", "s.npz", "--mode", "exact")
    assert result.exit_code == 1 and "utterance 'utt02'" in result.stderr and "cut.ark" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.npz").exists()
    (tmp_path / "bad.scp").write_text("utt00 f.ark:1\n")
    result = run("fit-bn", "scp:bad.scp", "-o", "s.npz", "--mode", "exact")
    assert result.exit_code == 1 and "utt00" in result.stderr and "f.ark" in result.stderr
    (tmp_path / "pipe.scp").write_text("utt00 gunzip -c x.ark.gz |\n")
    result = run("fit-bn", "scp:pipe.scp", "-o", "s.npz", "--mode", "exact")
    assert result.exit_code == 1 and "pipe" in result.stderr


def test_archive_changed_while_read_is_an_error(tmp_path: Path) -> None:
    utts = _utterances(3)
    ark = tmp_path / "f.ark"
    kaldiio.save_ark(str(ark), utts)
    with ns.open_stream([f"ark:{ark}"]) as stream:
        blocks = stream.blocks(2, prefetch=False)
        next(blocks)
        with open(ark, "ab") as f:
            f.write(b"x")
        with pytest.raises(ns.DataError, match="changed while it was read"):
            list(blocks)


# --- HDF5 collections ------------------------------------------------------------------------


def _espnet_h5(path: Path, utts: dict[str, np.ndarray]) -> None:
    with h5py.File(path, "w") as f:
        for key, value in utts.items():
            group = "train" if int(key[3:]) % 2 == 0 else "dev"
            f.create_dataset(f"{group}/{key}", data=value, chunks=(4, value.shape[1]) if len(value) > 4 else None,
                             compression="gzip" if len(value) > 4 else None)


def test_hdf5_group_and_glob_read_in_sorted_key_order(tmp_path: Path) -> None:
    utts = _utterances(8)
    path = tmp_path / "feats.h5"
    _espnet_h5(path, utts)
    train = sorted(k for k in utts if int(k[3:]) % 2 == 0)
    for spec, keys in ((f"{path}:/train", train), (f"{path}:/train/*", [f"train/{k}" for k in train]),
                       (f"{path}:/", sorted([f"dev/{k}" for k in utts if k not in train] + [f"train/{k}" for k in train]))):
        data, stream = _read_all(spec, block_rows=3)
        assert stream.sources[0].keys == keys
        np.testing.assert_array_equal(data, np.concatenate([utts[k.rpartition("/")[2]] for k in keys]))


def test_hdf5_group_walk_enters_each_group_once_through_hard_link_loops(tmp_path: Path) -> None:
    path = tmp_path / "loops.h5"
    with h5py.File(path, "w") as f:
        f["g/a/x"] = np.full((2, 3), 1, np.float32)
        f["g/a/b/y"] = np.full((1, 3), 2, np.float32)
        f["g/a/b/up"] = f["g/a"]  # a hard link back to an ancestor: a loop for a naive walk
        f["g/c"] = f["g/a/b"]  # the same group under a second name: its members once
        f["g/z"] = f["g/a/x"]  # the same dataset under a second name: a member of its own
    data, stream = _read_all(f"{path}:/g", block_rows=2)
    assert stream.sources[0].keys == ["a/b/y", "a/x", "z"]
    np.testing.assert_array_equal(data, np.concatenate([np.full((1, 3), 2), np.full((2, 3), 1),
                                                        np.full((2, 3), 1)]).astype(np.float32))


def test_hdf5_group_without_slash_says_how_to_read_it(tmp_path: Path) -> None:
    _espnet_h5(tmp_path / "f.h5", _utterances(2))
    with pytest.raises(ns.UsageError, match=r"is a group, not a dataset.*give .*f.h5:/train\)"):
        ns.open_source(f"{tmp_path / 'f.h5'}:train")


def test_hdf5_collection_members_obey_the_outside_data_policy(tmp_path: Path) -> None:
    (tmp_path / "inner").mkdir()
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.ones((3, 2), np.float32)
    with h5py.File(tmp_path / "inner" / "c.h5", "w") as f:
        f["g/a"] = np.zeros((2, 2), np.float32)
        f["g/b"] = h5py.ExternalLink("../other.h5", "/x")
    with pytest.raises(ns.UsageError, match="outside the input's folder"):
        ns.open_source(f"{tmp_path / 'inner' / 'c.h5'}:/g")
    source = ns.open_source(f"{tmp_path / 'inner' / 'c.h5'}:/g", allow_external=True)
    assert source.keys == ["a", "b"] and source.rows == 5


def test_hdf5_collection_shape_mismatch_names_the_key(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["g/a"] = np.zeros((2, 2), np.float32)
        f["g/b"] = np.zeros((2, 3), np.float32)
    with pytest.raises(ns.DataError, match="'b'"):
        ns.open_source(f"{tmp_path / 'c.h5'}:/g")


def test_memory_is_bounded_by_the_block_and_one_utterance(tmp_path: Path) -> None:
    """16 MB of utterances read 256 rows at a time: the peak of allocations stays near
    one utterance plus one block, far below the archive."""
    import tracemalloc

    rng = np.random.default_rng(2)
    utts = {f"u{i:03d}": rng.normal(size=(500, 40)).astype(np.float32) for i in range(200)}
    kaldiio.save_ark(str(tmp_path / "big.ark"), utts, scp=str(tmp_path / "big.scp"))
    del utts
    for spec in (f"scp:{tmp_path / 'big.scp'}", f"ark:{tmp_path / 'big.ark'}"):
        tracemalloc.start()
        try:
            with ns.open_stream([spec]) as stream:
                rows = sum(block.shape[0] for block in stream.blocks(256, prefetch=False))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert rows == 200 * 500
        assert peak < 2_000_000, peak  # the archive is 16 MB; one utterance 80 KB


def test_a_bad_value_names_the_utterance_and_frame(tmp_path: Path, run) -> None:
    utts = {"a": np.ones((5, 3), np.float32), "b": np.arange(12, dtype=np.float32).reshape(4, 3)}
    utts["b"][2, 1] = np.nan
    kaldiio.save_ark(str(tmp_path / "nan.ark"), utts, scp=str(tmp_path / "nan.scp"))
    result = run("fit-bn", "scp:nan.scp", "--mode", "exact", "-o", "s.npz")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: utterance 'b' of scp:nan.scp row 2: column 1 holds nan")


def test_parallel_jobs_over_a_collection_equal_one_process(tmp_path: Path, run) -> None:
    utts = _utterances(9, dims=3)
    kaldiio.save_ark(str(tmp_path / "f.ark"), utts, scp=str(tmp_path / "f.scp"))
    for jobs in ("1", "2"):
        assert run("fit-bn", "scp:f.scp", "--mode", "exact", "--jobs", jobs, "-o", f"s{jobs}.npz", "-q").exit_code == 0
    x = np.concatenate(list(utts.values())).astype(np.float64)
    for jobs in ("1", "2"):
        np.testing.assert_allclose(ns.read_stats(tmp_path / f"s{jobs}.npz").arrays["mean"], x.mean(0), rtol=1e-12)


def test_an_archive_under_another_extension_is_read_by_content(tmp_path: Path) -> None:
    utts = _utterances(3)
    kaldiio.save_ark(str(tmp_path / "feats.bin"), utts)
    data, stream = _read_all(str(tmp_path / "feats.bin"))
    np.testing.assert_array_equal(data, np.concatenate(list(utts.values())))
    assert stream.sources[0].keys == list(utts)
    (tmp_path / "notes.bin").write_bytes(b"hello \0Bworld")
    with pytest.raises(ns.DataError, match="neither a .npy nor an HDF5 file"):
        ns.open_source(str(tmp_path / "notes.bin"))
