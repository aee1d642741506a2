"""Collections of many sequences (issue 13): an index of arrays, members read by pread,
scp headers read per archive, INPUT opened once; against plain NumPy and h5py/kaldiio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns
from normstats.readers.base import KeyTable

kaldiio = pytest.importorskip("kaldiio")


def _read_all(spec: str, block_rows: int = 5, **options) -> tuple[np.ndarray, ns.Stream]:
    with ns.open_stream([spec], **options) as stream:
        data = np.concatenate([block.copy() for block in stream.blocks(block_rows, prefetch=False)])
        return data, stream


def test_key_table_holds_keys_in_order_and_finds_a_repeat() -> None:
    keys = ["b", "", "ä-ü", "a" * 300, "c d"]
    table = KeyTable(keys)
    assert list(table) == keys and len(table) == 5 and table[2] == "ä-ü" and table[-1] == "c d"
    assert table == keys and table != keys[:-1] and table.first_repeated() is None
    assert KeyTable(["x", "y", "x"]).first_repeated() == "x"
    with pytest.raises(IndexError):
        table[5]


# --- HDF5 collections: pread for contiguous members, h5py for the rest -----------------------


def _mixed_h5(path: Path) -> dict[str, np.ndarray]:
    """Members of every kind a collection may hold, in one group; returns key -> data."""
    rng = np.random.default_rng(3)
    utts = {f"u{i:02d}": rng.normal(size=(int(rng.integers(2, 9)), 4)).astype(np.float32) for i in range(12)}
    with h5py.File(path, "w") as f:
        for number, (key, value) in enumerate(sorted(utts.items())):
            if number % 4 == 1:
                f.create_dataset(f"g/{key}", data=value, chunks=(2, 4), compression="gzip")
            elif number % 4 == 2:
                f.create_dataset(f"g/{key}", data=value.astype(">f8"))  # big-endian, another dtype
            else:
                f[f"g/{key}"] = value
        f["elsewhere"] = utts["u11"]
        del f["g/u11"]
        f["g/u11"] = h5py.SoftLink("/elsewhere")  # a link: located under the policy
        f.create_dataset("g/sub/u99", data=np.arange(8, dtype=np.float32).reshape(2, 4))
    utts["sub/u99"] = np.arange(8, dtype=np.float32).reshape(2, 4)
    return utts


def test_mixed_collection_reads_every_frame_in_sorted_key_order(tmp_path: Path) -> None:
    utts = _mixed_h5(tmp_path / "m.h5")
    keys = sorted(utts)
    expected = np.concatenate([utts[key].astype(np.float64) for key in keys])
    for block_rows in (1, 3, 64):
        data, stream = _read_all(f"{tmp_path / 'm.h5'}:/g", block_rows)
        np.testing.assert_array_equal(data, expected)
    source = stream.sources[0]
    assert source.keys == keys and source.dtype == np.float64
    # the contiguous members of the file itself are read by pread; chunked and linked ones by h5py
    by_pread = {key for key, offset in zip(source.keys, source._offsets) if offset >= 0}
    with h5py.File(tmp_path / "m.h5") as f:
        assert by_pread == {key for key in keys if f["g"].get(key, getlink=True).__class__ is h5py.HardLink
                            and f[f"g/{key}"].chunks is None}
    assert 0 < len(by_pread) < len(keys)


def test_collection_fit_equals_numpy(tmp_path: Path, run) -> None:
    utts = _mixed_h5(tmp_path / "m.h5")
    frames = np.concatenate([utts[key].astype(np.float64) for key in sorted(utts)])
    result = run("fit-bn", "m.h5:/g", "--mode", "exact", "-o", "s.npz")
    assert result.exit_code == 0, result.stderr
    stats = ns.read_stats(tmp_path / "s.npz")
    np.testing.assert_allclose(stats.arrays["mean"], frames.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.arrays["var"], frames.var(axis=0, ddof=1), rtol=1e-9)


def test_external_storage_member_is_refused_without_allow_external(tmp_path: Path) -> None:
    raw = np.arange(6, dtype=np.float32)
    raw.tofile(tmp_path / "raw.bin")
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["g/a"] = np.zeros((2, 3), np.float32)
        f.create_dataset("g/b", shape=(2, 3), dtype=np.float32, external=[("raw.bin", 0, 24)])
    with pytest.raises(ns.UsageError, match="external storage"):
        ns.open_source(f"{tmp_path / 'c.h5'}:/g")
    data, stream = _read_all(f"{tmp_path / 'c.h5'}:/g", allow_external=True)
    np.testing.assert_array_equal(data, np.concatenate([np.zeros((2, 3)), raw.reshape(2, 3)]))
    assert list(stream.sources[0]._offsets) == [stream.sources[0]._offsets[0], -1]


def test_file_changed_under_the_run_stops_naming_the_key(tmp_path: Path, run) -> None:
    with h5py.File(tmp_path / "c.h5", "w") as f:
        for i in range(6):
            f[f"g/k{i}"] = np.full((3, 2), i, np.float32)
    with ns.open_stream([f"{tmp_path / 'c.h5'}:/g"]) as stream:
        blocks = stream.blocks(2, prefetch=False)
        next(blocks)
        with open(tmp_path / "c.h5", "ab") as f:
            f.write(b"x")
        with pytest.raises(ns.DataError, match=r"changed while it was read \(dataset 'k\d'"):
            list(blocks)


def test_member_cut_while_read_is_one_error_line(tmp_path: Path, monkeypatch) -> None:
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["g/a"] = np.ones((3, 2), np.float32)
        f["g/b"] = np.ones((300, 2), np.float32)
        cut = f["g/b"].id.get_offset() + 8
    source = ns.open_source(f"{tmp_path / 'c.h5'}:/g")
    os.truncate(tmp_path / "c.h5", cut)
    monkeypatch.setattr(source, "_check_file", lambda *args: None)  # only the short read is left to see
    with pytest.raises(ns.DataError, match=r"dataset 'b' of .* ends early"):
        source.read_into(0, np.empty((303, 2), np.float32))


# --- Kaldi: scp headers per archive ----------------------------------------------------------


def test_scp_out_of_archive_order_over_two_archives_equals_kaldiio(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    utts = {f"s{i:03d}": rng.normal(size=(int(rng.integers(1, 6)), 3)).astype(np.float32) for i in range(40)}
    keys = list(utts)
    kaldiio.save_ark(str(tmp_path / "a.ark"), {k: utts[k] for k in keys[:20]}, scp=str(tmp_path / "a.scp"))
    kaldiio.save_ark(str(tmp_path / "b.ark"), {k: utts[k] for k in keys[20:]}, scp=str(tmp_path / "b.scp"),
                     compression_method=2)
    lines = (tmp_path / "a.scp").read_text().splitlines() + (tmp_path / "b.scp").read_text().splitlines()
    order = rng.permutation(len(lines))
    (tmp_path / "all.scp").write_text("\n".join(lines[i] for i in order) + "\n")
    data, stream = _read_all(f"scp:{tmp_path / 'all.scp'}", 7)
    loaded = kaldiio.load_scp(str(tmp_path / "all.scp"))
    np.testing.assert_array_equal(data, np.concatenate([loaded[k] for k in loaded]))
    assert stream.sources[0].keys == [lines[i].split()[0] for i in order]


def test_a_bad_header_among_many_names_its_line_and_key(tmp_path: Path) -> None:
    utts = {f"k{i:03d}": np.full((2, 3), i, np.float32) for i in range(30)}
    kaldiio.save_ark(str(tmp_path / "f.ark"), utts, scp=str(tmp_path / "f.scp"))
    lines = (tmp_path / "f.scp").read_text().splitlines()
    key, target = lines[17].split()
    lines[17] = f"{key} {target.rsplit(':', 1)[0]}:{int(target.rsplit(':', 1)[1]) + 3}"
    (tmp_path / "bad.scp").write_text("\n".join(lines) + "\n")
    with pytest.raises(ns.DataError, match=r"bad.scp line 18 \(utterance 'k017'\).*no binary Kaldi matrix"):
        ns.open_source(f"scp:{tmp_path / 'bad.scp'}")


@pytest.mark.parametrize("layout", ["scp", "h5"])
def test_index_too_large_for_memory_is_one_error_naming_the_figure(tmp_path: Path, run, monkeypatch,
                                                                   layout) -> None:
    members = {f"k{i}": np.ones((1, 2), np.float32) for i in range(50)}
    if layout == "scp":
        kaldiio.save_ark(str(tmp_path / "f.ark"), members, scp=str(tmp_path / "f.scp"))
        spec = "scp:f.scp"
    else:
        with h5py.File(tmp_path / "f.h5", "w") as f:
            for key, value in members.items():
                f[f"g/{key}"] = value
        spec = "f.h5:/g"
    monkeypatch.setattr("normstats.readers.base.available_memory", lambda: 20_000)
    result = run("fit-bn", spec, "--mode", "exact", "-o", "s.npz")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert f"{spec} holds 50 sequences, whose index takes about 20.0 KB" in result.stderr
    assert "merge" in result.stderr and not (tmp_path / "s.npz").exists()


def test_an_hdf5_group_too_large_for_memory_is_refused_while_it_is_walked(tmp_path: Path, monkeypatch) -> None:
    # The links are counted as the walk goes (counting them first cost HDF5 ~50 MB per
    # 100 000 members): the index stops growing at the check after the limit.
    from normstats.readers import h5collection

    with h5py.File(tmp_path / "f.h5", "w") as f:
        for i in range(50):
            f[f"g/k{i:02d}"] = np.ones((1, 2), np.float32)
    monkeypatch.setattr(h5collection, "INDEX_CHECK_EVERY", 8)
    monkeypatch.setattr("normstats.readers.base.available_memory", lambda: 20_000)
    with pytest.raises(ns.DataError, match=r"f.h5:/g holds more than 32 sequences, whose index takes about 12.8 KB"):
        ns.open_source(f"{tmp_path / 'f.h5'}:/g")


def test_an_scp_too_large_for_memory_is_refused_while_it_is_read(tmp_path: Path, monkeypatch) -> None:
    # The scp is read once (no first pass to count its lines): its index is checked as it
    # grows, and it stops growing at the check after the limit.
    from normstats.readers import kaldi

    kaldiio.save_ark(str(tmp_path / "f.ark"), {f"k{i:02d}": np.ones((1, 2), np.float32) for i in range(50)},
                     scp=str(tmp_path / "f.scp"))
    monkeypatch.setattr(kaldi, "SCP_READ_BYTES", 1)  # a check after every line
    monkeypatch.setattr("normstats.readers.base.available_memory", lambda: 20_000)
    with pytest.raises(ns.DataError, match=r"f.scp holds more than 26 sequences, whose index takes about 10.4 KB"):
        ns.open_source(f"scp:{tmp_path / 'f.scp'}")


def test_an_ark_too_large_for_memory_is_refused_with_its_estimated_count(tmp_path: Path, monkeypatch) -> None:
    # An ark read without an scp is scanned; part-way, the count so far scaled to the file's
    # size is an estimate, and the message says so.
    from normstats.readers import kaldi

    kaldiio.save_ark(str(tmp_path / "f.ark"), {f"k{i:02d}": np.ones((1, 2), np.float32) for i in range(50)})
    monkeypatch.setattr(kaldi, "SCP_BATCH", 10)
    monkeypatch.setattr("normstats.readers.base.available_memory", lambda: 20_000)
    with pytest.raises(ns.DataError, match=r"f.ark holds about 50 sequences, whose index takes about 20.0 KB"):
        ns.open_source(f"ark:{tmp_path / 'f.ark'}")


# --- index bytes per member, measured in a fresh process -------------------------------------

MEASURE = """
import gc, json, sys, tracemalloc
import normstats as ns
ns.open_source(sys.argv[2]).close()  # the modules imported, before the count starts
gc.collect()
tracemalloc.start()
source = ns.open_source(sys.argv[1])
gc.collect()
kept, peak = tracemalloc.get_traced_memory()
print(json.dumps({"members": len(source.lengths), "kept": kept, "peak": peak, "index": source.index_bytes()}))
"""


def _measure(spec: str, small: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, spec, small], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("layout", ["scp", "h5"])
def test_index_bytes_per_member_are_tens_not_hundreds(tmp_path: Path, layout) -> None:
    count = 4000
    frames = np.arange(count * 2, dtype=np.float32).reshape(count, 1, 2)
    specs = []
    for name, members in (("f", count), ("small", 3)):
        if layout == "scp":
            kaldiio.save_ark(str(tmp_path / f"{name}.ark"), {f"utt{i:06d}": frames[i] for i in range(members)},
                             scp=str(tmp_path / f"{name}.scp"))
            specs.append(f"scp:{tmp_path / name}.scp")
        else:
            with h5py.File(tmp_path / f"{name}.h5", "w") as f:
                group = f.create_group("g")
                for i in range(members):
                    group[f"utt{i:06d}"] = frames[i]
            specs.append(f"{tmp_path / name}.h5:/g")
    spec = specs[0]
    figures = _measure(*specs)
    assert figures["members"] == count
    # 9-byte keys: key bytes and offset, length, end, file offset and a type number ~ 50 bytes
    assert figures["index"] / count < 60
    assert figures["kept"] / count < 120, figures  # everything this process still holds after opening
    data, _ = _read_all(spec, 333)
    np.testing.assert_array_equal(data, frames.reshape(count, 2))


# --- INPUT opened once by fit-bn -------------------------------------------------------------


def test_fit_bn_opens_input_once_with_groups_boundaries_and_a_mean_file(tmp_path: Path, run, monkeypatch) -> None:
    import normstats.keygroups as keygroups
    from normstats.readers import kaldi

    rng = np.random.default_rng(9)
    utts = {f"{spk}-{i}": rng.normal(size=(4, 3)).astype(np.float32) for spk in "ab" for i in range(3)}
    kaldiio.save_ark(str(tmp_path / "f.ark"), utts, scp=str(tmp_path / "f.scp"))
    (tmp_path / "utt2spk").write_text("".join(f"{key} {key[0]}\n" for key in utts))
    np.save(tmp_path / "m.npy", np.zeros(3, np.float32))
    opened, reads = [], []
    original, read_map = kaldi.KaldiSource.__init__, keygroups.read_map

    def counting(self, *args, **kwargs):
        opened.append(args)
        original(self, *args, **kwargs)

    monkeypatch.setattr(kaldi.KaldiSource, "__init__", counting)
    monkeypatch.setattr(keygroups, "read_map", lambda groups: reads.append(1) or read_map(groups))
    result = run("fit-bn", "scp:f.scp", "--groups", "utt2spk=utt2spk", "--mode", "exact", "-o", "s.npz")
    assert result.exit_code == 0, result.stderr
    assert len(opened) == 1 and len(reads) == 1
    stats = ns.read_stats(tmp_path / "s.npz")
    frames = np.concatenate([utts[key] for key in utts if key[0] == "b"]).astype(np.float64)
    assert stats.meta["group_names"] == ["a", "b"]
    np.testing.assert_allclose(stats.arrays["mean"][1], frames.mean(axis=0), rtol=1e-6)
    result = run("fit-bn", "scp:f.scp", "--batch-boundaries", "sequences", "--mean", "m.npy", "-o", "t.npz")
    assert result.exit_code == 0, result.stderr
    assert len(opened) == 2  # once more for the second command, once only within it
