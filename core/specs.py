"""Input specs, parsed in one place: what kind of data a spec names, and where.

A spec names its kind before any ``file:NAME`` split:

- ``scp:FILE`` / ``ark:FILE`` (Kaldi; options such as ``ark,s,cs:`` are
  accepted and ignored), and a bare ``FILE.scp`` / ``FILE.ark``;
- URLs (``s3://``, ``gs://``, ``http(s)://``, ...) of `.npy`, HDF5, Zarr, Parquet and
  Arrow objects, with ``:NAME`` after the object's name as for local files
  (``s3://bucket/x.h5:features``); the path is then a
  :class:`normstats.readers.remote.RemotePath`, which carries its storage options;
- ``store.zarr[:PATH]``, ``file.npz[:NAME]``, ``file.safetensors[:NAME]``,
  ``file.parquet:COLUMN`` (also ``.arrow``, ``.feather``, ``.ipc``),
  ``file.h5[:NAME]`` (a dataset, a ``/group`` or a ``/glob*``), ``file.npy``.

A path that exists as given is never split at a colon (so file names with
colons work); ``--dataset`` names the member when the spec does not.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

from .errors import UsageError
from .readers.remote import URL, RemotePath

KALDI = ("scp", "ark")
REMOTE_KINDS = ("array", "zarr", "parquet", "arrow")
KALDI_PREFIX = re.compile(r"^(scp|ark)((?:,[a-z]+)*):(.*)$", flags=re.S)
ZARR_MARKERS = (".zarray", ".zgroup", "zarr.json")
EXTENSIONS = {
    ".scp": "scp", ".ark": "ark", ".zarr": "zarr", ".npz": "npz", ".safetensors": "safetensors",
    ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow",
}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What one input spec names.

    Attributes
    ----------
    kind : str
        'scp', 'ark', 'zarr', 'npz', 'safetensors', 'parquet', 'arrow', or
        'array' (a `.npy` or HDF5 file, told apart by its content).
    path : str
        The file (or Zarr folder) to read.
    name : str or None
        The member, dataset, group, glob, tensor or column inside it.
    spec : str
        As given, for messages.
    """

    kind: str
    path: str
    name: Optional[str]
    spec: str


def kind_of_path(path: str) -> str:
    """The kind a path names by its extension (or a Zarr folder by its marker files)."""
    extension = os.path.splitext(path.rstrip("/" + os.sep))[1].lower()
    if extension in EXTENSIONS:
        return EXTENSIONS[extension]
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in ZARR_MARKERS):
        return "zarr"
    return "array"


def parse_spec(spec: str, dataset: Optional[str] = None) -> InputSpec:
    """Parse one input spec (see the module's docstring).

    Raises
    ------
    UsageError
        A URL of a kind not read remotely, a Kaldi pipe or stdin, a
        Kaldi spec with a member name, or a name given twice differently.
    """
    spec = str(spec)  # a RemotePath stays one (it keeps its storage options)
    url = URL.match(spec)
    if url and not os.path.exists(spec):
        return _with_name(_remote_spec(spec, url.end()), dataset)
    kaldi = KALDI_PREFIX.match(spec)
    if kaldi and not os.path.exists(spec):
        kind, path = kaldi.group(1), kaldi.group(3)
        if URL.match(path):
            raise UsageError(f"{spec}: Kaldi archives are read from local disks only; copy it to a local disk "
                             "and give its path")
        if path in ("", "-") or path.rstrip().endswith("|") or path.lstrip().startswith("|"):
            raise UsageError(f"{spec}: normstats reads Kaldi archives from files, not from pipes or "
                             "standard input; write the archive to a file first")
        return _with_name(InputSpec(kind, path, None, spec), dataset)
    if os.path.exists(spec) or ":" not in spec:
        return _with_name(InputSpec(kind_of_path(spec), spec, None, spec), dataset)
    path, _, name = spec.rpartition(":")
    if dataset is not None and dataset != name:
        raise UsageError(f"{spec!r} names dataset {name!r} but --dataset says {dataset!r}")
    kind = kind_of_path(path)
    if kind in KALDI:
        raise UsageError(f"{spec}: a Kaldi {kind} has no members to name; give {kind}:{path}")
    return InputSpec(kind, path, name, spec)


def _remote_spec(spec: str, after_scheme: int) -> InputSpec:
    """A URL: the object's name ends at the last colon after the host (``s3://b/x.h5:NAME``)."""
    text = str.__str__(spec)
    slash = text.find("/", after_scheme)
    key = text[slash:] if slash >= 0 else ""
    name = None
    if ":" in key:
        cut = slash + key.rindex(":")
        text, name = text[:cut], text[cut + 1:]
        key = key[:key.rindex(":")]
    extension = os.path.splitext(key.rstrip("/"))[1].lower()
    kind = EXTENSIONS.get(extension, "array")
    if kind not in REMOTE_KINDS:
        raise UsageError(f"{spec}: {extension} files are read from local disks only (remote inputs are "
                         ".npy, HDF5, Zarr, Parquet and Arrow); copy it to a local disk and give its path")
    return InputSpec(kind, RemotePath(text, getattr(spec, "options", None)), name or None, text if name is None
                     else f"{text}:{name}")


def _with_name(parsed: InputSpec, dataset: Optional[str]) -> InputSpec:
    if dataset is None:
        return parsed
    if parsed.name is not None and parsed.name != dataset:
        raise UsageError(f"{parsed.spec!r} names dataset {parsed.name!r} but --dataset says {dataset!r}")
    if parsed.kind in KALDI:
        raise UsageError(f"{parsed.spec} is a Kaldi {parsed.kind}, which has no datasets; leave out --dataset")
    return dataclasses.replace(parsed, name=dataset)


def split_spec(spec: str, dataset: Optional[str] = None) -> tuple[str, Optional[str]]:
    """Split ``file.h5:NAME`` into path and dataset name (see :func:`parse_spec`).

    A path that exists as given is never split (so Windows drive letters and
    file names with colons work); `dataset` (from ``--dataset``) applies when
    the spec names no dataset.
    """
    parsed = parse_spec(spec, dataset)
    return parsed.path, parsed.name
