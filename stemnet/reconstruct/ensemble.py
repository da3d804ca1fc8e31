"""Module for the test-time-augmentation ensemble: the eight symmetries of the square.

Each symmetry (:func:`stemnet.data.d4_array`; displacement channels transformed as
vectors by :func:`stemnet.data.d4_vectors`; the tilt head's magnitudes per axis
permuted as :func:`stemnet.data.tilt_table` says) is applied to the image, the prediction
mapped back by the inverse element (closed form, :func:`stemnet.data.layout.d4_inverse`); the
reconstruction is the mean of the eight, the uncertainty their standard deviation.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from stemnet.data.layout import ELEMENTS, d4_inverse  # noqa: F401 (d4_inverse re-exported)
from stemnet.reconstruct.tiling import Predictor, predict_tiled

D4 = ELEMENTS  # (transpose, flip_y, flip_x), e = 4·transpose + 2·flip_y + flip_x


def _apply(element, maps: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A symmetry applied to ``{head: (H, W, K)}`` maps; 9-channel displacement as vectors."""
    from stemnet.data import d4_array, d4_vectors, tilt_table

    out = {}
    for key, value in maps.items():
        moved = d4_array(value, element, axes=(0, 1))
        if key == "displacement":
            moved = d4_vectors(moved, element, channel_axis=-1)
        elif key == "tilt":
            moved = moved[..., tilt_table(element)[0]]  # magnitudes (tilt_target): a symmetry permutes them
        out[key] = np.ascontiguousarray(moved)
    return out


def tta_members(predict: Predictor, image: np.ndarray, tile: Optional[Tuple[int, int]], *, tta: bool = True,
                batch_size: int = 64, progress: bool = False) -> List[Dict[str, np.ndarray]]:
    """One prediction per symmetry (8, or 1 without TTA), each mapped back to the image frame."""
    elements = D4 if tta else ((0, 0, 0),)
    members = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(elements), desc="reconstruct", unit="symmetry", leave=False)
    for g in elements:
        moved = np.ascontiguousarray(_apply(g, {"input": image})["input"])
        out = predict_tiled(predict, moved, tile, batch_size=batch_size)
        members.append(_apply(d4_inverse(g), out))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return members


def keras_predictor(model, batch_size: int = 64) -> Predictor:
    """``predict`` for a Keras model with a dict of outputs (eager, inference mode)."""

    def predict(x: np.ndarray) -> Dict[str, np.ndarray]:
        parts: Dict[str, list] = {}
        for start in range(0, len(x), batch_size):
            out = model(x[start:start + batch_size], training=False)
            if not isinstance(out, dict):
                out = {"potential": out}
            for key, value in out.items():
                parts.setdefault(key, []).append(np.asarray(value, np.float32))
        return {k: np.concatenate(v) for k, v in parts.items()}

    return predict
