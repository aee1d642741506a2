"""How an HDF5 dataset stores its data, read once when its source opens it.

The readers that go around h5py (:mod:`~normstats.readers.h5_contiguous` by
``pread``, :mod:`~normstats.readers.h5_chunks` by raw chunks) decide from
this whether they can take a dataset, without opening it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Storage:
    """The storage of one dataset.

    Attributes
    ----------
    layout : {'contiguous', 'chunked', 'other'}
    offset : int or None
        Byte offset of a contiguous dataset's data in its file; None when it has
        none (not allocated) or the data is filtered or external.
    chunk : tuple of int
        The chunk shape of a chunked dataset (else empty).
    filters : tuple of int
        HDF5 filter ids, in pipeline order.
    """

    layout: str
    offset: Optional[int] = None
    chunk: tuple = ()
    filters: tuple = ()


def storage_of(dataset: Any) -> Storage:
    """The :class:`Storage` of an open h5py dataset."""
    import h5py

    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    filters = tuple(int(plist.get_filter(i)[0]) for i in range(plist.get_nfilters()))
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dataset.id.get_offset()
        plain = not filters and not plist.get_external_count() and offset is not None
        return Storage("contiguous", int(offset) if plain else None, (), filters)
    if layout == h5py.h5d.CHUNKED:
        return Storage("chunked", None, tuple(int(n) for n in plist.get_chunk()), filters)
    return Storage("other", None, (), filters)


def plain_storage(source: Any, dtype: Any) -> Optional[Storage]:
    """The storage `source` read when it opened its dataset, if it is a plain HDF5
    dataset source read as `dtype` (native byte order) without conversion; else None."""
    from .h5dataset import H5Source

    if type(source) is not H5Source or source.dtype != dtype or not source.dtype.isnative:
        return None
    return getattr(source, "storage", None)
