"""The files one command touches, and the rules between them.

A command declares every file it reads (features, labels, weights, groups,
init, gamma, beta, stats, resume; ``file:NAME`` specs count as the file) and
every file it writes (output, checkpoint, plot). Before any work,
:meth:`CommandFiles.check` refuses an output that is the same file as an
input or as another output -- by device and inode, so symbolic and hard
links count, and by resolved path for files that do not exist yet -- even
with ``--force``. Each output's own checks (format, folder, existing file)
are :func:`normstats.writers.base.check_output`'s.

A checkpoint records the :func:`identities` of the inputs it covers, so a
resumed fit reads the same files, not others of the same names.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from .errors import UsageError
from .file_signatures import is_hdf5
from .hdf5_policy import linked_files
from .readers.remote import is_url
from .specs import split_spec
from .stream import Stream
from .writers.base import check_output, split_output


# Inputs opened as streams: the files they read through links are checked once they are
# open (check_unread); the others (stats, centers, --gamma, --init ...) are small and read whole.
STREAM_ROLES = {"input", "--labels file", "--weights file", "--groups file"}


@dataclasses.dataclass(frozen=True)
class FileUse:
    """One file a command touches: its `role` as the user named it (e.g.
    'input', '--labels file', 'output'), the `spec` as given, and the file's `path`."""

    role: str
    spec: str
    path: str


@dataclasses.dataclass(frozen=True)
class _Output:
    use: FileUse
    formats: Sequence[str]
    may_be: Optional[str]  # the role of the one input this output may be (a checkpoint resumed)


class CommandFiles:
    """The inputs and outputs of one command, checked against each other.

    Examples
    --------
    >>> from normstats.writers.base import STATS_FORMATS
    >>> files = CommandFiles().reads("input", "x.npy").writes("output", "x.npy", STATS_FORMATS)
    >>> files.conflicts()[0]
    "output 'x.npy' is the same file as the input 'x.npy'; write to another path"
    """

    def __init__(self) -> None:
        self.inputs: list[FileUse] = []
        self._outputs: list[_Output] = []
        self._distinct: set[str] = set()
        self._whole: set[str] = set()

    def reads(self, role: str, *specs: Optional[str], distinct: bool = False, whole: bool = False) -> "CommandFiles":
        """Declare input `specs` (None and empty ones are skipped); with `distinct`,
        no two of them may be one file (each is counted once, like the parts of a merge);
        `whole`: files read whole, not streamed, whatever the role (the parts of a merge)."""
        for spec in specs:
            if spec:
                self.inputs.append(FileUse(role, str(spec), split_spec(str(spec))[0]))
        if distinct:
            self._distinct.add(role)
        if whole:
            self._whole.add(role)
        return self

    def writes(self, role: str, spec: Optional[str], formats: Sequence[str], *,
               may_be: Optional[str] = None) -> "CommandFiles":
        """Declare an output (skipped if None) in one of `formats`; it may be the
        same file as the input of role `may_be` (a checkpoint that is resumed)."""
        if spec:
            self._outputs.append(_Output(FileUse(role, str(spec), split_output(str(spec))[0]), formats, may_be))
        return self

    @property
    def outputs(self) -> list[FileUse]:
        return [output.use for output in self._outputs]

    def conflicts(self) -> list[str]:
        """Why outputs collide with inputs or with each other, or distinct inputs are one
        file (empty if none of these)."""
        problems = []
        for i, output in enumerate(self._outputs):
            for other in self.inputs + [o.use for o in self._outputs[:i]]:
                if other.role == output.may_be or not overwrites(output.use.path, other.path):
                    continue
                linked = os.path.abspath(output.use.path) != os.path.abspath(other.path)
                what, how = ("is inside", "") if os.path.isdir(other.path) else \
                    ("is the same file as", " (through a link)" if linked else "")
                problems.append(f"{output.use.role} {output.use.path!r} {what} the {other.role} "
                                f"{other.spec!r}{how}; write to another path")
        for output in self._outputs:
            for use in self.inputs:
                if (use.role in STREAM_ROLES and use.role not in self._whole) or use.role == output.may_be:
                    continue
                for path in _linked(use.path):
                    if overwrites(output.use.path, path):
                        problems.append(f"{output.use.role} {output.use.path!r} is the same file as {path!r}, "
                                        f"which the {use.role} {use.spec!r} reads through an HDF5 link; "
                                        "write to another path")
        # An input given twice comes after the collisions that would destroy a file
        for i, use in enumerate(self.inputs):
            for other in self.inputs[:i]:
                if use.role == other.role and use.role in self._distinct and same_file(use.path, other.path):
                    problems.append(f"{use.role} {use.spec!r} is the same file as {other.spec!r}; its data would "
                                    "count twice: give each file once")
        return problems

    def check(self, *, force: bool) -> None:
        """Refuse, before any work, outputs that collide with inputs or each other
        (whatever `force`), and outputs :func:`~normstats.writers.base.check_output` refuses.

        Raises
        ------
        UsageError
        """
        problems = self.conflicts()
        if problems:
            raise UsageError(problems[0])
        for output in self._outputs:
            resumed = any(use.role == output.may_be and same_file(output.use.path, use.path)
                          for use in self.inputs)
            check_output(output.use.spec, force=force or resumed, formats=output.formats)


def _linked(path: str) -> list[str]:
    """The files an HDF5 input `path` reads through its links (none for other files)."""
    if is_url(path) or not os.path.isfile(path) or not is_hdf5(path):
        return []
    return linked_files(path)


def same_file(a: str, b: str) -> bool:
    """Whether paths `a` and `b` name one file: the same device and inode if both
    exist (so links count), else the same resolved path (a file yet to be made).
    An object given by URL is never a local file (it is not looked up)."""
    if is_url(a) or is_url(b):
        return is_url(a) and is_url(b) and str.__str__(a) == str.__str__(b)
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def overwrites(output: str, path: str) -> bool:
    """Whether writing `output` would replace the file `path`, or one inside the
    folder `path` (a Zarr store: its metadata and chunks are files there)."""
    if same_file(output, path):
        return True
    if is_url(output) or is_url(path) or not os.path.isdir(path):
        return False
    folder = os.path.realpath(path)
    return os.path.commonpath([folder, os.path.realpath(output)]) == folder


def check_unread(outputs: CommandFiles, stream: Stream) -> None:
    """Refuse outputs that are files the opened `stream` reads beyond its specs (the
    archives an scp points into, the files an HDF5 collection links to).

    Raises
    ------
    UsageError
    """
    for output in outputs.outputs:
        for source in stream.sources:
            for path in source.files():
                if not is_url(path) and overwrites(output.path, path):
                    raise UsageError(f"{output.role} {output.path!r} is the same file as {path!r}, which the input "
                                     f"{source.name} reads; write to another path")


def identities(streams: dict[str, Stream]) -> list[dict]:
    """What identifies each file read by `streams` (role -> stream): role,
    absolute path, dataset, size and modification time in nanoseconds (for an
    object by URL: the URL, its size and its version, ETag and last change);
    after each source, the other files it reads (dataset None)."""
    found = []
    for role, stream in streams.items():
        for source in stream.sources:
            if is_url(source.path):
                url, tag, size, changed = source._identity
                found.append({"role": role, "path": url, "dataset": source.dataset, "size": size,
                              "mtime_ns": None, "version": f"{tag} {changed}"})
                continue
            info = os.stat(source.path)
            found.append({"role": role, "path": os.path.abspath(source.path), "dataset": source.dataset,
                          "size": info.st_size, "mtime_ns": info.st_mtime_ns})
            # the data files behind an index: the archives an scp names, the files HDF5 links lead to
            for path in dict.fromkeys(source.files()):
                if path != source.path and not is_url(path):
                    info = os.stat(path)
                    found.append({"role": role, "path": os.path.abspath(path), "dataset": None,
                                  "size": info.st_size, "mtime_ns": info.st_mtime_ns})
    return found


def identity_mismatch(recorded: Sequence[dict], current: Sequence[dict]) -> Optional[str]:
    """How the files now read differ from those a checkpoint recorded (None: they do not)."""
    if len(recorded) != len(current):
        return f"it covers {len(recorded)} input files, this run reads {len(current)}"
    for was, now in zip(recorded, current):
        where = f"{was.get('role', 'input')} {was.get('path')!r}"
        if (was.get("role"), was.get("path"), was.get("dataset")) != (now["role"], now["path"], now["dataset"]):
            dataset = f":{now['dataset']}" if now["dataset"] else ""
            return f"it covers the {where}, this run reads {now['path']!r}{dataset} in its place"
        if was.get("size") != now["size"]:
            return f"the {where} has changed since (size {was.get('size')} -> {now['size']} bytes)"
        if was.get("mtime_ns") != now["mtime_ns"] or was.get("version") != now.get("version"):
            return f"the {where} has been modified since"
    return None
