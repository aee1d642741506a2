"""normstats: BatchNorm statistics and class centers over data larger than memory.

The library API mirrors the command line::

    import normstats as ns

    with ns.open_stream(["train.h5:features"]) as stream:
        state = ns.BatchNormEMA(alpha=0.01, batch_size=256)
        stats = ns.fit_batchnorm(state, stream)
    ns.write_stats(stats, "stats.npz")

Every estimator is a state object with ``update`` / ``merge`` / ``result``
that never touches files; readers (:mod:`normstats.readers`, streamed by
:mod:`normstats.stream`) and writers (:mod:`normstats.writers`) never compute.

Names load on first use (PEP 562), so ``import normstats`` -- and the
console script's start -- stays light until a name is needed.
"""

import os
import sys

if os.path.basename(sys.argv[0] if sys.argv else "") == "normstats":  # the console script starts
    import _signal  # not `signal`: building its enums takes long enough to be interrupted

    def _interrupted_at_start(signum: int, frame: object) -> None:
        # Until normstats.cli.main takes over nothing has been written: say so and leave
        # at once (an exception here would end in a traceback of the imports).
        os.write(2, b"Error: interrupted; no partial output was written\n")
        os._exit(130)

    _signal.signal(_signal.SIGINT, _interrupted_at_start)
    _signal.signal(_signal.SIGTERM, _interrupted_at_start)

import importlib
import types
from typing import Any

from ._version import __version__

# name -> the module defining it
_EXPORTS = {
    **dict.fromkeys(["apply_collection"], "apply_collections"),
    **dict.fromkeys(["NearestCenters"], "assign"),
    **dict.fromkeys(["BatchNormEMA", "BatchNormExact", "batchnorm_state"], "batchnorm"),
    **dict.fromkeys(["CentersEMA", "CentersExact", "centers_state"], "centers"),
    **dict.fromkeys(["apply_dask", "dask_client", "run_fit_dask", "run_fit_parallel"], "engines"),
    **dict.fromkeys(["DataError", "EngineError", "NonFiniteError", "NormstatsError", "OutputError", "StatsFileError", "UsageError"], "errors"),
    **dict.fromkeys(["Export", "export_stats", "import_torch", "stats_from_torch", "to_espnet", "to_kaldi", "to_keras", "to_torch"], "interop"),
    **dict.fromkeys(["GroupedMoments", "Moments"], "accumulators"),
    **dict.fromkeys(["merge_moments", "moments"], "moments"),
    **dict.fromkeys(["Normalizer"], "normalize"),
    **dict.fromkeys(["apply_stats", "assign_rows", "fit_batchnorm", "fit_centers", "merge_stats", "run_fit"], "pipeline"),
    **dict.fromkeys(["resume_row"], "resume"),
    **dict.fromkeys(["Recipe"], "recipe"),
    **dict.fromkeys(["open_source"], "readers.api"),
    **dict.fromkeys(["Stream", "open_stream"], "stream"),
    **dict.fromkeys(["Stats"], "stats"),
    **dict.fromkeys(["read_array"], "readers.small_arrays"),
    **dict.fromkeys(["read_stats", "write_stats"], "writers.stats_files"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    try:  # a submodule, e.g. normstats.pipeline
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps an exported name bound to the export when a submodule of the same
    name is imported (``normstats.moments`` is the function, as it always was)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
