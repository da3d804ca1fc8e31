"""Module for predicting an image of any size tile by tile with seamless blending.

The model's input size is the tile. An image larger than a tile along an axis is
reflect-padded and covered at a stride of a quarter tile (:data:`OVERLAP` tiles over
every pixel); predictions are blended with the separable window ``w(k) = sin²(π(k + ½)/T)``
(never zero), normalised by the summed weights, and the padding is cropped.

Why a quarter tile: at that stride the four windows over a pixel sum to 2 *and* their
squares sum to 3/2 wherever the pixel lies (sin⁴ of four phases π/4 apart), so every
pixel is the same weighted average of four tile predictions -- an ensemble of the same
effective size (8/3 tiles per axis) everywhere. At half a tile the squares sum to
``1 − sin²(2θ)/2``: a pixel on a tile border is one tile's prediction, a pixel between
borders the mean of two, and the border's error shows as a seam.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from stemnet.errors import UserError

Predictor = Callable[[np.ndarray], Dict[str, np.ndarray]]


def window(length: int) -> np.ndarray:
    """``sin²(π(k + ½)/T)``: positive everywhere; shifted by T/2 it sums to one."""
    k = np.arange(length)
    return np.sin(np.pi * (k + 0.5) / length) ** 2


OVERLAP = 4  # tiles over every pixel along an axis: stride tile // OVERLAP


def tile_stride(tile: int) -> int:
    """Distance between neighbouring tile origins [px]: a quarter tile (at least 1)."""
    return max(1, int(tile) // OVERLAP)


def tile_starts(length: int, tile: int) -> List[int]:
    """Tile origins along an axis of ``length`` ≥ ``tile``: every :func:`tile_stride`,
    the last one flush with the end."""
    if length <= tile:
        return [0]
    stride = tile_stride(tile)
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _pad_plan(length: int, tile: int) -> Tuple[int, int]:
    """Reflect padding (before, after) along an axis: a tile less one stride on each side,
    so every pixel is under :data:`OVERLAP` tiles, and the end rounded up to a whole
    stride, so the grid is regular."""
    if length == tile:
        return 0, 0
    if length < tile:
        before = (tile - length) // 2
        return before, tile - length - before
    stride = tile_stride(tile)
    margin = tile - stride
    return margin, margin + (-(length + 2 * margin - tile)) % stride


def predict_tiled(predict: Predictor, image: np.ndarray, tile: Optional[Tuple[int, int]],
                  batch_size: int = 64) -> Dict[str, np.ndarray]:
    """Predict ``(H, W, C)`` with ``predict`` on overlapping tiles and blend the outputs.

    ``predict`` maps ``(N, th, tw, C)`` float32 to ``{head: (N, th, tw, K)}``; ``tile=None``
    means one pass over the whole image (for models that take any size).
    """
    h, w, _ = image.shape
    if tile is None:
        out = predict(np.ascontiguousarray(image[None], np.float32))
        return {k: np.asarray(v[0], np.float32) for k, v in out.items()}
    th, tw = (int(t) for t in tile)
    (py0, py1), (px0, px1) = _pad_plan(h, th), _pad_plan(w, tw)
    padded = np.pad(image, ((py0, py1), (px0, px1), (0, 0)), mode="reflect") if py0 + py1 + px0 + px1 else image
    ph, pw, _ = padded.shape
    ys, xs = tile_starts(ph, th), tile_starts(pw, tw)
    weight = np.outer(window(th) if len(ys) > 1 else np.ones(th), window(tw) if len(xs) > 1 else np.ones(tw))
    weight = weight.astype(np.float64)[..., None]
    acc: Dict[str, np.ndarray] = {}
    wsum = np.zeros((ph, pw, 1), np.float64)
    origins = [(y, x) for y in ys for x in xs]
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        batch = np.stack([padded[y:y + th, x:x + tw] for y, x in chunk]).astype(np.float32)
        out = predict(batch)
        for key, value in out.items():
            value = np.asarray(value, np.float64)
            if value.shape[1:3] != (th, tw):
                raise UserError(f"model output {key!r} is {value.shape[1:3]} per tile; expected the tile's {(th, tw)}")
            if key not in acc:
                acc[key] = np.zeros((ph, pw, value.shape[-1]), np.float64)
            for (y, x), v in zip(chunk, value):
                acc[key][y:y + th, x:x + tw] += weight * v
        for y, x in chunk:
            wsum[y:y + th, x:x + tw] += weight
    return {k: (v / wsum)[py0:py0 + h, px0:px0 + w].astype(np.float32) for k, v in acc.items()}
