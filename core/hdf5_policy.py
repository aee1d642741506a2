"""The one way normstats opens an HDF5 dataset for reading: the outside-data policy.

An HDF5 file can pull data from elsewhere: soft links (within a file),
external links (to another file), virtual datasets (sources in other files)
and external raw storage (plain files). HDF5 resolves relative names of
other files against environment prefixes, then the file's folder, and, when
nothing is found there, against the *working directory*. normstats never lets
it decide: every link is followed here, one step at a time, with relative
names resolved against the folder of the file that holds them, the target
must exist there, and it must stay within the input's folder (unless
``allow_external``). The dataset is then opened by its hard path in the file
that really holds it, so HDF5 follows no link on its own; virtual sources
and external storage are looked up with the ``${ORIGIN}`` prefix (the
file's folder), the place checked here.

Declared sizes are checked at the same time (a 10 KB file can declare a
terabyte): contiguous data must be stored in full inside the file, chunked
data must have every chunk written (a missing chunk would read as the fill
value, silently), and no chunk may end past the end of the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from typing import Any, Iterator, Optional

from .errors import DataError, UsageError
from .file_signatures import is_hdf5
from .limits import check_fits_memory, elements

MAX_HOPS = 40  # links followed for one name; beyond it, a loop
CHUNK_SCAN_LIMIT = 1_000_000  # chunks whose file offsets are checked one by one
BASE_CACHE_BYTES = 16 << 20  # aligned 8 MB blocks read each chunk once; more only costs memory
CACHE_MEMORY_SHARE = 0.25  # of the available memory, at most, for one dataset's chunk cache
# Where HDF5 looks first for the files of external links and virtual sources (before the
# file's folder): set, they would send it elsewhere than the place checked here.
PREFIX_VARIABLES = {"external link": "HDF5_EXT_PREFIX", "virtual dataset source": "HDF5_VDS_PREFIX"}
_PRINTF = re.compile(r"%[^%]")  # a virtual source named by pattern (%b): files not known in advance


class MissingName(UsageError):
    """The name asked for does not exist in the file given (no link involved)."""


@dataclasses.dataclass(frozen=True)
class Located:
    """Where a name of an HDF5 file really leads.

    Attributes
    ----------
    file : str
        The file holding the object, as HDF5 would name it (relative names
        joined to the linking file's folder).
    name : str
        The object's path in `file`, through hard links only.
    is_dataset : bool
    """

    file: str
    name: str
    is_dataset: bool
    files: tuple = ()  # every file the resolution met: link holders, virtual sources, external storage


@dataclasses.dataclass
class _Walk:
    """One resolution: the policy's parameters, and what was checked already."""

    folder: str  # the input's folder (real path): nothing may lead outside it
    top: str  # the input file
    display: str  # how messages name what is read
    allow_external: bool
    checked: set = dataclasses.field(default_factory=set)  # (file, name) of datasets checked or being checked
    active: set = dataclasses.field(default_factory=set)  # ... of the virtual datasets being checked
    handles: Optional[dict] = None  # file -> open h5py.File, kept across names by locate_many
    met: dict = dataclasses.field(default_factory=dict)  # every file met, in order (the keys)


def _located(walk: _Walk, found: Located) -> Located:
    """`found` with the files `walk` met on its way (an output must be none of them)."""
    return dataclasses.replace(found, files=tuple(walk.met))


def locate(path: str, name: str, *, allow_external: bool = False, display: Optional[str] = None) -> Located:
    """Follow `name` in the HDF5 file `path` to the object it names, checking the policy.

    Every soft and external link on the way is followed here (relative
    external names against the folder of the file holding the link), and a
    dataset's virtual sources and external storage are checked, recursively.

    Raises
    ------
    UsageError
        A link, virtual source or external storage leads outside the folder of
        `path` (or uses external storage at all) and `allow_external` is off;
        or `name` does not exist.
    DataError
        A link is dangling or loops, a file on the way is not HDF5, or a
        dataset declares more data than its file holds.
    """
    walk = _Walk(os.path.realpath(os.path.dirname(os.path.abspath(path))), path,
                 display or f"{path}:{name}", allow_external)
    return _located(walk, _follow(walk, path, name, 0))


def locate_many(path: str, names: list[str], *, allow_external: bool = False,
                display: Optional[str] = None) -> list[Located]:
    """:func:`locate` for each of `names` (the members of a collection), with the same
    checks, each file on the way opened once for all of them.

    Raises
    ------
    UsageError, DataError
        As :func:`locate`; the message names the member.
    """
    shown = display or path
    walk = _Walk(os.path.realpath(os.path.dirname(os.path.abspath(path))), path, shown, allow_external,
                 handles={})
    try:
        found = []
        for name in names:
            walk.display = f"{shown} (dataset {name.lstrip('/')!r})"
            found.append(_located(walk, _follow(walk, path, name, 0)))
        return found
    finally:
        for handle in walk.handles.values():
            handle.close()


@contextlib.contextmanager
def _opened(file: str, walk: _Walk) -> Iterator[Any]:
    """`file` opened for `walk`: kept open for the next name when the walk keeps handles."""
    walk.met[file] = None
    if walk.handles is None:
        with open_file(file, walk) as f:
            yield f
        return
    if file not in walk.handles:
        walk.handles[file] = _open(file, walk)
    yield walk.handles[file]


def _parts(name: str) -> list[str]:
    return [part for part in name.split("/") if part not in ("", ".")]


def _follow(walk: _Walk, file: str, name: str, hops: int) -> Located:
    import h5py

    while True:
        if hops > MAX_HOPS:
            raise DataError(f"{walk.display}: more than {MAX_HOPS} HDF5 links in a row (a loop); fix the file")
        parts = _parts(name)
        with _opened(file, walk) as f:
            group, step = "/", None
            for index, part in enumerate(parts):
                rest = "/".join(parts[index + 1:])
                try:
                    link = f[group].get(part, getlink=True)
                except (TypeError, ValueError, KeyError) as error:
                    raise DataError(f"{walk.display}: {file} holds a link {part!r} of a kind normstats "
                                    f"does not follow ({error})") from None
                if link is None:
                    missing = "/" + "/".join(parts[:index + 1])
                    if hops == 0:
                        raise MissingName(f"{file} has no object {missing!r}")
                    raise DataError(f"{walk.display}: a link leads to {missing!r} in {file}, which does not "
                                    "exist (a dangling link); fix the file")
                if isinstance(link, h5py.HardLink):
                    group = f"{group.rstrip('/')}/{part}"
                    continue
                if isinstance(link, h5py.SoftLink):
                    target = link.path if link.path.startswith("/") else f"{group.rstrip('/')}/{link.path}"
                    step = (file, f"{target}/{rest}")
                elif isinstance(link, h5py.ExternalLink):
                    step = (_other_file(walk, file, link.filename, "external link"), f"{link.path}/{rest}")
                else:
                    raise DataError(f"{walk.display}: {file} holds a link {part!r} of a kind normstats "
                                    "does not follow")
                break
            if step is None:
                obj = f[group]
                is_dataset = isinstance(obj, h5py.Dataset)
                if is_dataset:
                    _check_dataset(walk, file, group, obj, hops)
                return Located(file, group, is_dataset)
        file, name = step
        hops += 1


def linked_files(path: str, limit: int = 1000) -> list[str]:
    """Every other existing file the HDF5 file `path` names, recursively: the files of
    its external links, virtual dataset sources and external storage (relative names
    against the folder of the file naming them). What an output must not replace, since
    reading `path` reads them too; at most `limit` files are visited."""
    import h5py

    found: dict[str, None] = {}
    pending = [path]
    while pending and len(found) < limit:
        holder = pending.pop()
        names: list[str] = []

        def link(name: str, info: Any, f: Any = None) -> None:
            target = f.get(name, getlink=True)
            if isinstance(target, h5py.ExternalLink):
                names.append(target.filename)

        def dataset(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                names.extend(entry[0] for entry in obj.external or ())
                if obj.is_virtual:
                    names.extend(source.file_name for source in obj.virtual_sources() if source.file_name != ".")

        try:
            with h5py.File(holder, "r") as f:
                if hasattr(f, "visit_links"):  # h5py >= 3.11; before it, external links are not listed
                    f.visit_links(lambda name, info=None: link(name, info, f))
                f.visititems(dataset)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError):
            continue  # not readable here: the reader itself says so
        for name in names:
            target = os.path.join(os.path.dirname(holder), os.fsdecode(name))
            if os.path.isfile(target) and target not in found and not os.path.samefile(target, path):
                found[target] = None
                if is_hdf5(target):
                    pending.append(target)
    return list(found)


@contextlib.contextmanager
def open_file(path: str, walk: Optional[_Walk] = None) -> Iterator[Any]:
    """An HDF5 file opened read-only; not HDF5 (or damaged) is a DataError."""
    with _open(path, walk) as f:
        yield f


def _open(path: str, walk: Optional[_Walk] = None) -> Any:
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as error:
        what = f"{walk.display}: " if walk is not None and path != walk.top else ""
        raise DataError(f"{what}{path} is not a readable HDF5 file ({error})") from None


def _inside(folder: str, path: str) -> bool:
    return os.path.commonpath([folder, os.path.realpath(path)]) == folder


def _other_file(walk: _Walk, holder: str, filename: str, kind: str) -> str:
    """The file that `holder`'s `kind` names `filename`, as HDF5 opens it, if the policy allows."""
    if not isinstance(filename, str):
        filename = os.fsdecode(filename)
    via = "" if holder == walk.top else f" (in {holder})"
    if not walk.allow_external:
        if _PRINTF.search(filename):
            raise UsageError(f"{walk.display} reads {filename!r} through an HDF5 {kind}{via} named by a "
                             "pattern, so its files cannot be checked; pass --allow-external if you trust them")
        variable = PREFIX_VARIABLES.get(kind)
        if variable and os.environ.get(variable):
            raise UsageError(f"{walk.display} uses an HDF5 {kind}{via}, and {variable} is set, which makes "
                             f"HDF5 look for its file there first; unset {variable} or pass --allow-external")
    target = os.path.join(os.path.dirname(holder), filename)  # an absolute filename stays as it is
    if not walk.allow_external and not _inside(walk.folder, target):
        raise UsageError(f"{walk.display} reads {filename!r} through an HDF5 {kind}{via}, outside the "
                         "input's folder; pass --allow-external if you trust that file")
    if not os.path.isfile(target):
        # HDF5 would then try the working directory: never read whatever happens to be there
        raise DataError(f"{walk.display}: its HDF5 {kind}{via} names {filename!r}, and {target} does not "
                        "exist; copy that file beside it")
    return target


def _check_dataset(walk: _Walk, file: str, name: str, dataset: Any, hops: int) -> None:
    """The virtual sources and external storage of `dataset`, and its declared size."""
    key = (os.path.realpath(file), name)
    if key in walk.active:
        raise DataError(f"{walk.display}: virtual datasets that are sources of each other (a loop); fix the file")
    if key in walk.checked:
        return
    walk.checked.add(key)
    via = "" if file == walk.top else f" (in {file})"
    external = dataset.external
    if external:
        if not walk.allow_external:
            raise UsageError(f"{walk.display} reads {os.fsdecode(external[0][0])!r} through HDF5 external "
                             f"storage{via} (raw data in other files); pass --allow-external if you trust them")
        for entry in external:
            target = os.path.join(os.path.dirname(file), os.fsdecode(entry[0]))
            walk.met[target] = None
            if not os.path.isfile(target):
                raise DataError(f"{walk.display}: its HDF5 external storage{via} names "
                                f"{os.fsdecode(entry[0])!r}, and {target} does not exist")
        return
    if dataset.is_virtual:
        sources = dataset.virtual_sources()
        mapped = sum(source.vspace.get_select_npoints() for source in sources)
        if dataset.shape is not None and mapped < elements(dataset.shape):
            raise DataError(f"{walk.display}: its virtual dataset{via} maps {mapped} of its "
                            f"{elements(dataset.shape)} elements to sources; the rest would read as the "
                            "fill value, not data")
        walk.active.add(key)
        for source in sources:
            source_file = file if source.file_name == "." else _other_file(
                walk, file, source.file_name, "virtual dataset source")
            if not walk.allow_external and _PRINTF.search(source.dset_name):
                raise UsageError(f"{walk.display}: a virtual dataset source{via} is named by the pattern "
                                 f"{source.dset_name!r}; pass --allow-external if you trust its files")
            found = _follow(walk, source_file, source.dset_name, hops + 1)
            if not found.is_dataset:
                raise DataError(f"{walk.display}: its virtual dataset source {source.dset_name!r} in "
                                f"{source_file} is not a dataset")
        walk.active.discard(key)
        return
    check_storage(dataset, file, f"{walk.display}{via}")


def check_storage(dataset: Any, file: str, display: str) -> None:
    """Refuse a dataset whose file does not hold the data it declares.

    Raises
    ------
    DataError
        Contiguous data not stored in full or past the end of the file; chunks
        missing (they would read as the fill value) or past the end of the file.
    """
    import h5py

    if dataset.shape is None:
        return
    declared = elements(dataset.shape) * dataset.dtype.itemsize
    if declared == 0:
        return
    size = os.path.getsize(file)
    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    remedy = "re-create or re-copy it"
    if layout == h5py.h5d.CONTIGUOUS:
        offset, stored = dataset.id.get_offset(), dataset.id.get_storage_size()
        if offset is None or stored < declared or offset + declared > size:
            held = 0 if offset is None else max(0, min(stored, size - offset))
            raise DataError(f"{display} declares {declared} bytes of data but its file holds {held} of "
                            f"them; it is truncated or was never fully written: {remedy}")
    elif layout == h5py.h5d.CHUNKED:
        chunk = plist.get_chunk()
        # HDF5 decodes a whole chunk to read any of it: a chunk declared far beyond the data
        # (an extensible dataset may have one) must fit in memory
        check_fits_memory(elements(chunk) * dataset.dtype.itemsize, f"{display}: one of its chunks")
        expected = math.prod(-(-int(n) // int(c)) for n, c in zip(dataset.shape, chunk))
        written = dataset.id.get_num_chunks()
        if written < expected:
            raise DataError(f"{display} has {written} of its {expected} chunks written; the rest would read "
                            f"as the fill value, not data: {remedy}")
        if written <= CHUNK_SCAN_LIMIT:
            end = [0]

            def visit(info: Any) -> None:
                end[0] = max(end[0], info.byte_offset + info.size)

            dataset.id.chunk_iter(visit)
            if end[0] > size:
                raise DataError(f"{display} has chunks up to byte {end[0]} but its file ends at {size}; "
                                f"it is truncated: {remedy}")


def chunk_cache(dataset: Any, memory: int) -> tuple[int, int]:
    """(slots, bytes) of a chunk cache that holds the chunks a read block spans.

    Compressed chunks are decoded whole; if the cache cannot hold all chunks
    across the rows of a block (twice: a block may straddle two chunk rows),
    each is decoded again for every block that touches it. Uncompressed
    chunks are read directly, so they keep the small default.
    """
    plist = dataset.id.get_create_plist()
    import h5py

    if plist.get_layout() != h5py.h5d.CHUNKED or plist.get_nfilters() == 0:
        return 100_003, BASE_CACHE_BYTES
    chunk = plist.get_chunk()
    chunk_bytes = elements(chunk) * dataset.dtype.itemsize
    across = math.prod(-(-int(n) // int(c)) for n, c in zip(dataset.shape[1:], chunk[1:]))
    wanted = 2 * across * chunk_bytes + chunk_bytes
    nbytes = max(BASE_CACHE_BYTES, min(wanted, int(memory * CACHE_MEMORY_SHARE)))
    return _prime_at_least(max(100_003, 100 * (nbytes // max(chunk_bytes, 1)))), nbytes


def _prime_at_least(n: int) -> int:
    """HDF5 asks for a prime number of cache slots (fewer collisions)."""
    n |= 1
    while any(n % d == 0 for d in range(3, math.isqrt(n) + 1, 2)):
        n += 2
    return n


def open_dataset(located: Located, *, cache: Optional[tuple[int, int]] = None) -> tuple[Any, Any]:
    """Open the dataset `located` points to: (file, dataset), to be closed together.

    External storage and virtual sources resolve against the file's folder
    (``${ORIGIN}``), the place :func:`locate` checked; `cache` sets the chunk
    cache (slots, bytes).
    """
    import h5py

    with contextlib.ExitStack() as stack:
        stack.enter_context(_h5_errors(located))
        f = stack.enter_context(h5py.File(located.file, "r"))
        dataset = open_in(f, located, cache=cache)
        stack.pop_all()
        return f, dataset


def open_in(file: Any, located: Located, *, cache: Optional[tuple[int, int]] = None) -> Any:
    """The dataset `located` points to, in `file` (``located.file``, already open):
    for a collection of many datasets in one file, opened once."""
    import h5py

    with _h5_errors(located):
        access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        access.set_efile_prefix(b"${ORIGIN}")
        access.set_virtual_prefix(b"${ORIGIN}")
        if cache is not None:
            access.set_chunk_cache(cache[0], cache[1], 1.0)  # fully read chunks leave first
        return h5py.Dataset(h5py.h5d.open(file.id, located.name.encode(), dapl=access))


@contextlib.contextmanager
def _h5_errors(located: Located) -> Iterator[None]:
    try:
        yield
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        raise DataError(f"{located.file}:{located.name} cannot be opened ({error}); the file is damaged "
                        "or changed since it was checked") from None
