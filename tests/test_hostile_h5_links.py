"""The outside-data policy against HDF5 tricks: every way a file can pull data
from outside its folder (or from the working directory) is refused, and
links that stay inside still read."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import normstats as ns

DATA = np.arange(12.0).reshape(6, 2)
SECRET = DATA + 100  # what an outside file holds: reading it would shift the mean by 100


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """in/ (the input's folder, with a subfolder) and out/ (outside), each with a plain file."""
    inside, outside = tmp_path / "in", tmp_path / "out"
    (inside / "sub").mkdir(parents=True)
    outside.mkdir()
    with h5py.File(outside / "secret.h5", "w") as f:
        f["x"] = SECRET
    with h5py.File(inside / "local.h5", "w") as f:
        f["x"] = DATA
    return inside, outside


def _vds(path: Path, source_file: str, source_name: str = "x") -> None:
    layout = h5py.VirtualLayout(shape=DATA.shape, dtype="f8")
    layout[:] = h5py.VirtualSource(source_file, source_name, shape=DATA.shape)
    with h5py.File(path, "a") as f:
        f.create_virtual_dataset("x", layout, fillvalue=-1)


def _links(path: Path, **links) -> Path:
    with h5py.File(path, "a") as f:
        for name, link in links.items():
            f[name] = link
    return path


def _refused(run, spec: str, out: Path, *words: str, code: int = 2) -> None:
    result = run("fit-bn", spec, "-o", out, "--mode", "exact")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in result.output and not out.exists()


def _mean(run, spec: str, out: Path, *extra: str) -> np.ndarray:
    result = run("fit-bn", spec, "-o", out, "--mode", "exact", "--force", *extra)
    assert result.exit_code == 0, result.stderr
    return np.load(out)["mean"]


def test_soft_link_to_an_external_link_is_followed_and_refused(run, folders) -> None:
    inside, _ = folders
    _links(inside / "a.h5", ext=h5py.ExternalLink("../out/secret.h5", "/x"), x=h5py.SoftLink("/ext"))
    _refused(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "external link", "--allow-external")
    np.testing.assert_allclose(_mean(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "--allow-external"),
                               SECRET.mean(0))


def test_relative_soft_link_through_groups_to_external_link_is_refused(run, folders) -> None:
    inside, _ = folders
    with h5py.File(inside / "a.h5", "w") as f:
        f.create_group("g")["ext"] = h5py.ExternalLink("../out/secret.h5", "/x")
        f["g/x"] = h5py.SoftLink("ext")  # relative to /g
    _refused(run, f"{inside / 'a.h5'}:g/x", inside / "s.npz", "external link")


def test_external_link_to_an_inside_file_that_links_outside_is_refused(run, folders) -> None:
    inside, _ = folders
    _links(inside / "sub" / "mid.h5", x=h5py.ExternalLink("../../out/secret.h5", "/x"))
    _links(inside / "a.h5", x=h5py.ExternalLink("sub/mid.h5", "/x"))
    _refused(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "external link", "mid.h5")


def test_virtual_source_reached_through_a_link_is_refused(run, folders) -> None:
    inside, _ = folders
    _links(inside / "src.h5", x=h5py.ExternalLink("../out/secret.h5", "/x"))
    _vds(inside / "a.h5", "src.h5")  # the source file is inside; its dataset is a link out
    _refused(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "external link")


def test_nested_virtual_datasets_leading_outside_are_refused(run, folders) -> None:
    inside, _ = folders
    _vds(inside / "sub" / "inner.h5", "../../out/secret.h5")
    _vds(inside / "a.h5", "sub/inner.h5")
    _refused(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "virtual dataset source", "inner.h5")


def test_virtual_source_in_the_same_file_through_a_soft_link_to_outside_is_refused(run, folders) -> None:
    inside, _ = folders
    _links(inside / "a.h5", ext=h5py.ExternalLink("../out/secret.h5", "/x"), hop=h5py.SoftLink("/ext"))
    _vds(inside / "a.h5", ".", "hop")
    _refused(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "external link")


@pytest.mark.parametrize("kind", ["external link", "virtual dataset source"])
def test_relative_names_never_resolve_against_the_working_directory(run, folders, tmp_path, kind) -> None:
    """The target is missing beside the file but exists in the working directory (where HDF5
    would look next): refused, not read."""
    inside, _ = folders
    with h5py.File(tmp_path / "decoy.h5", "w") as f:  # `run` works in tmp_path
        f["x"] = SECRET
    if kind == "external link":
        _links(inside / "a.h5", x=h5py.ExternalLink("decoy.h5", "/x"))
    else:
        _vds(inside / "a.h5", "decoy.h5")
    _refused(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "decoy.h5", "does not exist", code=1)
    # nor with --allow-external: a missing file is never looked for elsewhere
    result = run("fit-bn", f"{inside / 'a.h5'}:x", "-o", inside / "s.npz", "--allow-external")
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_prefix_variable_sending_hdf5_elsewhere_is_refused(run, folders, monkeypatch) -> None:
    inside, outside = folders
    with h5py.File(outside / "src.h5", "w") as f:
        f["x"] = SECRET
    with h5py.File(inside / "src.h5", "w") as f:
        f["x"] = DATA
    _vds(inside / "a.h5", "src.h5")
    monkeypatch.setenv("HDF5_VDS_PREFIX", str(outside))
    _refused(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "HDF5_VDS_PREFIX")
    monkeypatch.delenv("HDF5_VDS_PREFIX")
    np.testing.assert_allclose(_mean(run, f"{inside / 'a.h5'}:x", inside / "s.npz"), DATA.mean(0))


def test_external_raw_storage_is_refused_even_inside(run, folders) -> None:
    inside, _ = folders
    (inside / "raw.bin").write_bytes(DATA.tobytes())
    with h5py.File(inside / "a.h5", "w") as f:
        f.create_dataset("x", shape=DATA.shape, dtype="f8", external=[("raw.bin", 0, DATA.nbytes)])
    _refused(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "external storage", "--allow-external")
    np.testing.assert_allclose(_mean(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "--allow-external"),
                               DATA.mean(0))


def test_external_raw_storage_resolves_against_the_file_folder_not_the_cwd(run, folders, tmp_path) -> None:
    inside, _ = folders
    (tmp_path / "raw.bin").write_bytes(SECRET.tobytes())  # the working directory of `run`
    with h5py.File(inside / "a.h5", "w") as f:
        f.create_dataset("x", shape=DATA.shape, dtype="f8", external=[("raw.bin", 0, DATA.nbytes)])
    result = run("fit-bn", f"{inside / 'a.h5'}:x", "-o", inside / "s.npz", "--allow-external")
    assert result.exit_code == 1 and "raw.bin" in result.stderr and "does not exist" in result.stderr


def test_link_loops_are_an_error(run, folders) -> None:
    inside, _ = folders
    _links(inside / "a.h5", x=h5py.SoftLink("/y"), y=h5py.SoftLink("/x"))
    _refused(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "loop", code=1)


def test_links_that_stay_inside_read_the_right_data(run, folders) -> None:
    inside, _ = folders
    with h5py.File(inside / "sub" / "part.h5", "w") as f:
        f["x"] = DATA
    _links(inside / "sub" / "hop.h5", x=h5py.ExternalLink("part.h5", "/x"))  # relative to sub/
    _links(inside / "a.h5", ext=h5py.ExternalLink("sub/hop.h5", "/x"), soft=h5py.SoftLink("/ext"))
    _vds(inside / "a.h5", "sub/hop.h5")
    for name in ("ext", "soft", "x"):
        np.testing.assert_allclose(_mean(run, f"{inside / 'a.h5'}:{name}", inside / "s.npz"), DATA.mean(0))


def test_a_symlinked_folder_outside_is_outside(run, folders) -> None:
    inside, outside = folders
    (inside / "door").symlink_to(outside)
    _links(inside / "a.h5", x=h5py.ExternalLink("door/secret.h5", "/x"))
    _refused(run, f"{inside / 'a.h5'}:x", inside / "s.npz", "outside")


# --- stats files, gamma/beta, --init: the same policy ------------------------------


def _stats_h5(path: Path) -> None:
    ns.write_stats(ns.BatchNormExact().update(DATA).result(), str(path))


@pytest.mark.parametrize("how", ["external link", "external storage", "virtual dataset source"])
def test_stats_file_arrays_from_outside_are_refused(run, folders, how) -> None:
    inside, outside = folders
    stats = inside / "stats.h5"
    _stats_h5(stats)
    mean = np.full(2, 1e6)
    with h5py.File(outside / "mean.h5", "w") as f:
        f["mean"] = mean
    (outside / "mean.bin").write_bytes(mean.tobytes())
    with h5py.File(stats, "a") as f:
        del f["mean"]
        if how == "external link":
            f["mean"] = h5py.ExternalLink("../out/mean.h5", "/mean")
        elif how == "external storage":
            f.create_dataset("mean", shape=(2,), dtype="f8", external=[("../out/mean.bin", 0, 16)])
        else:
            layout = h5py.VirtualLayout(shape=(2,), dtype="f8")
            layout[:] = h5py.VirtualSource("../out/mean.h5", "mean", shape=(2,))
            f.create_virtual_dataset("mean", layout)
    with pytest.raises(ns.NormstatsError, match=how.split()[-1]):
        ns.read_stats(str(stats))
    np.save(inside / "x.npy", DATA)
    for command in (["apply", stats, inside / "x.npy", "-o", inside / "y.npy"], ["inspect", stats],
                    ["fit-bn", inside / "x.npy", "--init", stats, "-o", inside / "s.npz", "--mode", "exact"]):
        result = run(*command)
        assert result.exit_code != 0 and result.stderr.startswith("Error: ") and "mean" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (inside / "y.npy").exists()
    allowed = run("apply", stats, inside / "x.npy", "-o", inside / "y.npy", "--allow-external")
    assert allowed.exit_code == 0, allowed.stderr
    inv_std = ns.read_stats(str(stats), allow_external=True).arrays["inv_std"]
    np.testing.assert_allclose(np.load(inside / "y.npy"), (DATA - mean) * inv_std)


def test_stats_file_with_an_inside_link_still_reads(folders) -> None:
    inside, _ = folders
    stats = inside / "stats.h5"
    _stats_h5(stats)
    expected = ns.read_stats(str(stats)).arrays["mean"]
    with h5py.File(inside / "sub" / "mean.h5", "w") as f:
        f["mean"] = expected
    with h5py.File(stats, "a") as f:
        del f["mean"]
        f["mean"] = h5py.ExternalLink("sub/mean.h5", "/mean")
    np.testing.assert_array_equal(ns.read_stats(str(stats)).arrays["mean"], expected)


def test_gamma_from_an_outside_link_is_refused(run, folders) -> None:
    inside, _ = folders
    np.save(inside / "x.npy", DATA)
    _stats_h5(inside / "stats.npz")
    _links(inside / "g.h5", gamma=h5py.ExternalLink("../out/secret.h5", "/x"))
    result = run("apply", inside / "stats.npz", inside / "x.npy", "--gamma", f"{inside / 'g.h5'}:gamma",
                 "-o", inside / "y.npy")
    assert result.exit_code == 2 and "external link" in result.stderr and not (inside / "y.npy").exists()


def test_virtual_datasets_that_are_sources_of_each_other_are_an_error(folders) -> None:
    inside, _ = folders
    _vds(inside / "a.h5", "b.h5")
    _vds(inside / "b.h5", "a.h5")
    with pytest.raises(ns.DataError, match="loop"):
        ns.open_source(f"{inside / 'a.h5'}:x")
