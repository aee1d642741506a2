"""Parquet and Arrow IPC columns as inputs: ``file.parquet:COLUMN``, ``file.arrow:COLUMN``
(``.feather``, ``.ipc``).

A column of fixed-size lists (or of lists that all have one length) holds
one feature vector per row; a column of numbers, one value per row. A
Parquet file is read one row group at a time, an Arrow IPC file one record
batch at a time (the one in use is kept for the next block), so memory is
bounded by the largest row group or batch.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..errors import DataError, UsageError
from ..limits import check_fits_memory
from .base import ArraySource
from .base import require


class ArrowColumn(ArraySource):
    """One column of a Parquet or Arrow IPC file, read by row groups / record batches."""

    def __init__(self, path: str, column: Optional[str], kind: str) -> None:
        pa = require("pyarrow", f"{path}:{column}" if column else path)
        self.path, self.kind = path, kind
        self._file: Optional[Any] = None
        self._cached: Optional[tuple[int, np.ndarray]] = None
        self._identity = self._current_identity()
        try:
            reader = self._reader()
            schema = reader.schema_arrow if kind == "parquet" else reader.schema
            if kind == "parquet":
                sizes = [reader.metadata.row_group(i).num_rows for i in range(reader.num_row_groups)]
            else:
                sizes = [reader.get_record_batch(i).num_rows for i in range(reader.num_record_batches)]
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path} is not a readable {kind} file ({error})") from None
        names = list(schema.names)
        if column is None:
            if len(names) != 1:
                raise UsageError(f"{path} has {len(names)} columns ({', '.join(names)}); name one as {path}:COLUMN")
            column = names[0]
        if column not in names:
            raise UsageError(f"{path} has no column {column!r}; it has: {', '.join(names) or 'none'}")
        self.dataset, self.name, self._column = column, f"{path}:{column}", column
        field = schema.field(column).type
        self._row_shape, value_type = self._layout(pa, field, reader, sizes)
        self.dtype = np.dtype(value_type.to_pandas_dtype())
        self._ends = np.cumsum(sizes)
        self.shape = (int(self._ends[-1]) if sizes else 0,) + self._row_shape
        self._validate()
        check_fits_memory(max(sizes) * self.row_bytes_of(), f"{self.name}: its largest row group")
        self.close()

    def row_bytes_of(self) -> int:
        return int(np.prod(self._row_shape, dtype=np.int64)) * self.dtype.itemsize

    def _reader(self) -> Any:
        if self._file is None:
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                self._file = pq.ParquetFile(self.path)
            else:
                import pyarrow as pa

                # read, not memory-mapped: a file cut under a mapping would end the process in SIGBUS
                self._file = pa.ipc.open_file(pa.OSFile(self.path))
        return self._file

    def _layout(self, pa: Any, field: Any, reader: Any, sizes: list[int]) -> tuple[tuple[int, ...], Any]:
        if pa.types.is_fixed_size_list(field):
            value = field.value_type
            shape: tuple[int, ...] = (field.list_size,)
        elif pa.types.is_list(field) or pa.types.is_large_list(field):
            value = field.value_type
            shape = (self._list_length(reader, sizes),)
        else:
            value, shape = field, ()
        if not (pa.types.is_floating(value) or pa.types.is_integer(value)):
            raise DataError(f"{self.name} holds {field}; a feature column holds numbers or lists of numbers")
        return shape, value

    def _list_length(self, reader: Any, sizes: list[int]) -> int:
        if not sizes:
            return 0
        first = self._part(0).combine_chunks() if hasattr(self._part(0), "combine_chunks") else self._part(0)
        return int(len(first[0].values)) if len(first) else 0

    def _part(self, index: int) -> Any:
        reader = self._reader()
        if self.kind == "parquet":
            return reader.read_row_group(index, columns=[self._column]).column(0)
        return reader.get_record_batch(index).column(self._column)

    def _values(self, index: int) -> np.ndarray:
        """Row group / record batch `index` as an array of shape (rows,) + row_shape."""
        import pyarrow as pa

        part = self._part(index)
        if isinstance(part, pa.ChunkedArray):
            part = part.combine_chunks()
        rows = len(part)
        where = f"{self.name} ({'row group' if self.kind == 'parquet' else 'record batch'} {index})"
        if part.null_count:
            raise DataError(f"{where} holds {part.null_count} null rows; fill or drop them first")
        if self._row_shape:
            if pa.types.is_list(part.type) or pa.types.is_large_list(part.type):
                offsets = np.asarray(part.offsets)
                lengths = np.diff(offsets)
                if np.any(lengths != self._row_shape[0]):
                    bad = int(np.flatnonzero(lengths != self._row_shape[0])[0])
                    raise DataError(f"{where}: row {bad} holds {lengths[bad]} values, not {self._row_shape[0]} "
                                    "as the first row; every row must have the same length")
            flat = part.flatten()
            if flat.null_count:
                raise DataError(f"{where} holds null values inside its lists; fill them first")
            values = flat.to_numpy(zero_copy_only=False).reshape((rows,) + self._row_shape)
        else:
            values = part.to_numpy(zero_copy_only=False)
        self._check_current()
        return values

    def read_into(self, start: int, out: np.ndarray) -> None:
        done, rows = 0, out.shape[0]
        while done < rows:
            row = start + done
            index = int(np.searchsorted(self._ends, row, side="right"))
            if self._cached is None or self._cached[0] != index:
                self._cached = None
                self._cached = (index, self._values(index))
            first = int(self._ends[index - 1]) if index else 0
            part = self._cached[1][row - first:]
            take = min(len(part), rows - done)
            out[done:done + take] = part[:take]
            done += take

    def close(self) -> None:
        self._file = None
        self._cached = None
