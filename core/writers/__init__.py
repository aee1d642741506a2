"""Writers: the atomic placement of outputs, and one module per file format.

Nothing here computes: stats go to disk as the state objects made them.
Every output is written under a temporary name in its target folder and
renamed into place only when complete (:mod:`.atomic`), so a failed or
interrupted run leaves either no file or the previous one, never a partial
file. :mod:`.base` holds the output formats and name checks; the stats
formats (:mod:`.stats_files` over :mod:`.stats_npz`, :mod:`.stats_h5`,
:mod:`.safetensors_file`, :mod:`.stats_json`), array outputs (:mod:`.rows`
over :mod:`.npy_layout`, :mod:`.h5_layout`) and files for other toolkits
(:mod:`.export`, :mod:`.kaldi_matrix`) each have their own module.
"""
