"""What the writers share: the output formats, output names and their checks
before any work, and why a file failed to load."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from ..errors import UsageError
from ..limits import require_regular_file, special_kind
from .atomic import TAG_CHARS, _temporary_name


STATS_FORMATS = (".npz", ".h5", ".hdf5", ".safetensors", ".json")
ARRAY_FORMATS = (".npy", ".h5", ".hdf5")
# assign writes labels and distances together: HDF5 only, since a zip (.npz) can have one
# member open for writing at a time, and two .npy files could not be renamed into place at once
ASSIGN_FORMATS = (".h5", ".hdf5")
# Every extension an output may have: a name after one of them (`out.h5:NAME`) is a dataset.
KNOWN_OUTPUTS = tuple(dict.fromkeys(STATS_FORMATS + ARRAY_FORMATS + (".png", ".cmvn", ".mat", ".ark")))


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def check_output(path: str, *, force: bool, formats: Sequence[str]) -> None:
    """Refuse an output path before any work is done.

    (Whether it is also an input, or another output, is the business of
    :class:`normstats.files.CommandFiles`, which calls this for each output.)

    Raises
    ------
    UsageError
        Unknown extension, missing or unwritable folder, a name too long for
        its temporary, an existing file (or link) without `force`, or a directory.
    """
    path, dataset = split_output(path)
    if dataset is not None and (formats is not ARRAY_FORMATS or _extension(path) == ".npy"):
        what = {".npy": "a .npy file holds one unnamed array"}.get(_extension(path)) or \
            ("a stats file takes no dataset name" if formats is STATS_FORMATS else "this output takes no dataset name")
        raise UsageError(f"output {path}:{dataset}: {what}; write {path}")
    if _extension(path) not in formats:
        raise UsageError(
            f"output {path!r} must end in one of {', '.join(formats)} (the format follows the extension)"
        )
    folder, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder!r} is not writable")
    if os.path.isdir(path):
        raise UsageError(f"output {path!r} is a directory")
    try:
        kind = special_kind(os.lstat(path).st_mode)
    except OSError:  # no such file (yet)
        kind = None
    if kind:  # --force replaces a file, never a FIFO, socket or device that has the name
        raise UsageError(f"output {path!r} is {kind}, not a file; write to another path")
    _check_name_length(folder, base)
    if os.path.lexists(path) and not force:
        raise UsageError(f"output {path!r} exists; pass --force to overwrite it")


def _check_name_length(folder: str, base: str) -> None:
    """The output's temporary must be a legal name in `folder`, or the work would be lost at the end."""
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    longest = len(os.fsencode(_temporary_name(base, "x" * TAG_CHARS)))
    if longest > name_max:
        room = name_max - (longest - len(os.fsencode(base)))
        raise UsageError(
            f"output name {base!r} is too long: its temporary needs {longest} bytes, and names in "
            f"{folder} have at most {name_max}; choose a name of at most {room} bytes"
        )


def split_output(spec: str) -> tuple[str, Optional[str]]:
    """Split an output ``file.h5:NAME`` (NAME may hold ``/``: ``file.h5:train/x``) into
    path and dataset name; a spec whose own extension is known is a plain path.

    >>> split_output("out.h5:train/x"), split_output("out.npy")
    (('out.h5', 'train/x'), ('out.npy', None))
    """
    if _extension(spec) in KNOWN_OUTPUTS:
        return spec, None
    cuts = [spec.lower().rfind(ext + ":") for ext in KNOWN_OUTPUTS]
    cut = max(cuts)
    if cut < 0:
        return spec, None
    end = cut + len(KNOWN_OUTPUTS[cuts.index(cut)])
    return spec[:end], spec[end + 1:].lstrip("/") or None


def require_file(path: str, what: str) -> None:
    """Raise UsageError unless `path` is an existing regular file (called `what`
    in the message): a pipe or device is refused before it is opened."""
    require_regular_file(path, what)


def _reason(error: Exception) -> str:
    """Why a stats file failed to load, without numpy's advice to unpickle."""
    text = str(error)
    if "pickle" in text:
        return "it is not a zip archive of plain arrays (normstats never unpickles)"
    return text or type(error).__name__
