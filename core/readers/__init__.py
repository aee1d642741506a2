"""Readers of the formats beyond `.npy` and one HDF5 dataset, one module per format.

Each is an :class:`normstats.readers.base.ArraySource` (rows, row_shape, dtype,
``read_into``) that opens its file lazily, checks declared sizes before it
reads and reads one block at a time. Sequence collections (Kaldi archives,
HDF5 groups) also keep each sequence's key (:class:`SequenceSource`).
"""
