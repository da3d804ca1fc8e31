"""The run folder: everything needed to resume training or to use the model later.

::

    RUN/config.yaml          the full resolved config (model section included)
    RUN/data.json            the dataset's shapes: input field, input/output shapes, targets
    RUN/normalization.json   the input/target normalisation (from the training manifest)
    RUN/checkpoints/         tf.train.CheckpointManager (model, optimizer, step, EMA)
    RUN/export/weights.h5    the final (EMA if configured) weights
    RUN/summary.json         steps, samples/s, skipped steps, final metrics
    RUN/tensorboard/         scalars and images
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

from stemnet.atomic import write_atomic, write_json_atomic  # noqa: F401 (write_json_atomic re-exported)
from stemnet.config import Config, load_config, to_yaml
from stemnet.errors import UserError
from stemnet.train.rundata import RunData

CONFIG = "config.yaml"
DATA = "data.json"
NORMALIZATION = "normalization.json"
CHECKPOINTS = "checkpoints"
EXPORT = "export"
WEIGHTS = "weights.h5"
SUMMARY = "summary.json"
TENSORBOARD = "tensorboard"




def save_run_files(run: Path, cfg: Config, data_info: dict, normalization: dict) -> None:
    """The config, data shapes and normalisation, written once at the start of a run."""
    run.mkdir(parents=True, exist_ok=True)
    write_atomic(run / CONFIG, to_yaml(cfg))
    RunData.model_validate(data_info).write(run / DATA)
    write_json_atomic(run / NORMALIZATION, normalization)


def load_run(run) -> Tuple[object, Config, dict, dict]:
    """Rebuild the exported model of a run folder.

    Returns ``(model, config, data_info, normalization_dict)``.
    """
    run = Path(run)
    weights = run / EXPORT / WEIGHTS
    for path in (run / CONFIG, run / DATA, run / NORMALIZATION, weights):
        if not path.is_file():
            raise UserError(f"{run}: not a finished run folder ({path.name} missing; expected an exported model from `stemnet train`)")
    cfg = load_config(run / CONFIG, require=("model",))
    data_info = RunData.read(run / DATA).model_dump(mode="json")
    normalization = json.loads((run / NORMALIZATION).read_text())
    from stemnet.models import build_model

    model = build_model(cfg.model, tuple(data_info["input_shape"]), tuple(data_info["output_shape"]))
    model.load_weights(str(weights))
    return model, cfg, data_info, normalization
