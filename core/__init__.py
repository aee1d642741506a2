"""normstats: BatchNorm statistics and class centers over data larger than memory.

The library API mirrors the command line::

    import normstats as ns

    with ns.open_stream(["train.h5:features"]) as stream:
        state = ns.BatchNormEMA(alpha=0.01, batch_size=256)
        stats = ns.fit_batchnorm(state, stream)
    ns.write_stats(stats, "stats.npz")

Every estimator is a state object with ``update`` / ``merge`` / ``result``
that never touches files; readers (:mod:`normstats.sources`) and writers
(:mod:`normstats.stores`) never compute.
"""

from ._version import __version__
from .assign import NearestCenters
from .batchnorm import BatchNormEMA, BatchNormExact, batchnorm_state
from .centers import CentersEMA, CentersExact, centers_state
from .engines import apply_dask, dask_client, run_fit_dask, run_fit_parallel
from .errors import DataError, EngineError, NonFiniteError, NormstatsError, StatsFileError, UsageError
from .interop import Export, export_stats, import_torch, stats_from_torch, to_espnet, to_kaldi, to_keras, to_torch
from .accumulators import GroupedMoments, Moments
from .moments import merge_moments, moments
from .normalize import Normalizer
from .recipe import Recipe
from .pipeline import apply_stats, assign_rows, fit_batchnorm, fit_centers, merge_stats, resume_row, run_fit
from .sources import Stream, open_source, open_stream
from .stats import Stats
from .stores import read_array, read_stats, write_stats

__all__ = [
    "__version__",
    "BatchNormEMA",
    "BatchNormExact",
    "batchnorm_state",
    "CentersEMA",
    "CentersExact",
    "centers_state",
    "DataError",
    "EngineError",
    "NonFiniteError",
    "NormstatsError",
    "StatsFileError",
    "UsageError",
    "Export",
    "export_stats",
    "import_torch",
    "stats_from_torch",
    "to_espnet",
    "to_kaldi",
    "to_keras",
    "to_torch",
    "GroupedMoments",
    "Moments",
    "merge_moments",
    "moments",
    "NearestCenters",
    "Normalizer",
    "apply_stats",
    "assign_rows",
    "fit_batchnorm",
    "fit_centers",
    "merge_stats",
    "resume_row",
    "run_fit",
    "Recipe",
    "run_fit_parallel",
    "run_fit_dask",
    "apply_dask",
    "dask_client",
    "Stream",
    "open_source",
    "open_stream",
    "Stats",
    "read_array",
    "read_stats",
    "write_stats",
]
