"""The training data: label layout, normalisation, rank assignment, augmentation, the
batch loader and the ``tf.data`` pipeline (shards → channels-last batches).

- :mod:`~stemnet.data.layout`: field names, sublattices, displacement channels, the
  eight symmetries of the square (with closed-form inverses);
- :mod:`~stemnet.data.normalization`: :class:`Normalization` (one definition, used by
  the pipeline, evaluation and reconstruction);
- :mod:`~stemnet.data.assignment`: which shards and records each rank reads, per epoch;
- :mod:`~stemnet.data.augment`: the symmetries applied to samples and as gather tables;
- :mod:`~stemnet.data.loader`: one batch of records → one packed float32 array;
- :mod:`~stemnet.data.pipeline`: :func:`make_dataset` and :class:`DatasetOptions`.
"""

from stemnet.data.assignment import ShardSlice, SplitPlan, assign_shards, epoch_order, plan_split
from stemnet.data.augment import GatherTables, augment_sample, grid_origin
from stemnet.data.layout import (
    COMPONENTS,
    DISPLACEMENT_CHANNELS,
    DX,
    DY,
    ELEMENTS,
    IDENTITY,
    INPUT_FIELDS,
    LABEL_CHANNELS,
    LABEL_FIELDS,
    SUBLATTICES,
    SWAP_XY,
    TARGET_FIELDS,
    TARGETS,
    TILT_CHANNELS,
    column_channel,
    d4_array,
    d4_inverse,
    d4_signs,
    d4_vectors,
    tilt_table,
    tilt_target,
    tilt_vectors,
    displacement_channel,
    element_index,
    input_field,
    is_cbed,
    map_shape,
    probe_grid,
)
from stemnet.data.loader import BatchLoader, gather
from stemnet.data.normalization import (
    CBED_NORMALIZATIONS,
    EPS,
    STEM_NORMALIZATIONS,
    Normalization,
    load_normalization,
)
from stemnet.data.pipeline import (
    READAHEAD_MIN_RECORD,
    DatasetOptions,
    choose_readahead,
    corrupt_count,
    dataset_loader,
    make_dataset,
    one_line_errors,
    record_bytes,
    user_error,
)
from stemnet.shards import close_shards

__all__ = [
    "BatchLoader", "CBED_NORMALIZATIONS", "COMPONENTS", "DISPLACEMENT_CHANNELS", "DX", "DY",
    "DatasetOptions", "ELEMENTS", "EPS", "GatherTables", "IDENTITY", "INPUT_FIELDS",
    "LABEL_CHANNELS", "LABEL_FIELDS", "Normalization", "READAHEAD_MIN_RECORD",
    "STEM_NORMALIZATIONS", "SUBLATTICES", "SWAP_XY", "ShardSlice", "SplitPlan", "TARGETS",
    "TARGET_FIELDS", "TILT_CHANNELS", "assign_shards", "augment_sample", "choose_readahead", "close_shards",
    "column_channel", "corrupt_count", "d4_array", "d4_inverse", "d4_signs", "d4_vectors", "tilt_table", "tilt_target", "tilt_vectors",
    "dataset_loader", "displacement_channel", "element_index", "epoch_order", "gather",
    "grid_origin", "input_field", "is_cbed", "load_normalization", "make_dataset", "map_shape",
    "one_line_errors", "plan_split", "probe_grid", "record_bytes", "user_error",
]
