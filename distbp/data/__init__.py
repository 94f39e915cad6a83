"""The batch plan and the data sources; nothing here knows of MPI (rank and size are passed in).

Batch plan (`plan`): every rank computes the same permutation of the n rows for an epoch, cuts
it into global batches and reads its own contiguous slice of each. A cursor
(epoch, step_in_epoch) is divmod(global_step, steps_per_epoch): an exact resume needs no RNG
state beyond the seed.
Sources (`Dataset`): HDF5 read by rows (`hdf5`), NPZ and bundled digits in memory (`files`),
synthetic data (`synthetic`), subsets (`sources`); `validate` checks one fits a network.
`open_dataset(..., y_name=None)` opens the inputs alone (prediction: the file need hold no y).
Bad data raises `DataError` with one line starting "data file '<source>': ".

This package's interface is the names listed here: callers write `from distbp import data;
data.X`. The helpers the submodules share (`sources.data_error`, `sources.check_file`,
`sources.check_layout`, `sources.no_labels`, `plan.row_blocks`) stay in their modules. Tests
that tune a module's constants patch the submodule that reads them (e.g. `data.hdf5`).
"""

from __future__ import annotations

from distbp.data.files import BUNDLED_DIR, HDF5_SUFFIXES, open_dataset
from distbp.data.hdf5 import CHUNK_CACHE_BYTES, SPAN_BYTES, HDF5Dataset
from distbp.data.plan import (
    SCAN_BYTES,
    batch_bounds,
    epoch_permutation,
    micro_cuts,
    shard_bounds,
    shard_indices,
    step_cursor,
    steps_per_epoch,
)
from distbp.data.sources import (
    ArrayDataset,
    Dataset,
    SubsetDataset,
    row_buffers,
    split_validation,
    subset,
)
from distbp.data.synthetic import (
    SYNTHETIC_BLOCK_BYTES,
    synthetic_blocks,
    synthetic_source,
    synthetic_spiral,
    synthetic_teacher,
)
from distbp.data.validate import validate_dataset

__all__ = ["BUNDLED_DIR", "CHUNK_CACHE_BYTES", "HDF5_SUFFIXES", "SCAN_BYTES", "SPAN_BYTES",
           "SYNTHETIC_BLOCK_BYTES", "ArrayDataset", "Dataset", "HDF5Dataset", "SubsetDataset",
           "batch_bounds", "epoch_permutation", "micro_cuts", "open_dataset",
           "row_buffers", "shard_bounds", "shard_indices", "split_validation", "step_cursor",
           "steps_per_epoch", "subset", "synthetic_blocks", "synthetic_source",
           "synthetic_spiral", "synthetic_teacher", "validate_dataset"]
