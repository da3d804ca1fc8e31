"""What one GPU does per training step: per-layer gradient bytes and backward times.

A :class:`Workload` lists the layers in backprop order (the order their gradients become
ready) with their float32 gradient bytes and backward seconds, plus the forward pass and
the optimizer update. It comes either from analytic FLOPs and a machine's peak rate
(:func:`analytic_workload`) or from timing the model on this host (:func:`measure_workload`).
The scaling model (``stemnet.distributed.scaling``) schedules the allreduces over it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from stemnet.config import ModelConfig
from stemnet.hpc.machines import PRECISION_PEAK, Network

ADAM_BYTES_PER_PARAM = 28  # read param, grad, m, v (16 B); write param, m, v (12 B), float32
GRAD_BYTES_PER_PARAM = 4


@dataclass(frozen=True)
class LayerCost:
    """One layer with trainable variables: gradient bytes (float32) and backward seconds."""

    name: str
    grad_bytes: int
    backward_s: float


@dataclass(frozen=True)
class Workload:
    """What one GPU does per step.

    Attributes
    ----------
    layers : layers in backprop order (the order their gradients become ready).
    forward_s, update_s : forward pass and optimizer update, seconds.
    tape_order : one ``(layer index, bytes)`` per variable in the order the tape returns
        gradients (``model.trainable_variables``); what ``count:N`` splits and ``none``
        fuses. Empty: one variable per layer in forward order (reverse backprop order).
    source : how compute times were obtained ("analytic ..." or "measured ...").
    other_s : the step's own work beyond forward, backward and update (loss, metrics,
        dispatch), seconds, serial: measured by ``stemnet scaling --calibrate`` as the
        training step without collectives minus the three; 0 elsewhere.
    """

    layers: Tuple[LayerCost, ...]
    forward_s: float
    update_s: float
    tape_order: Tuple[Tuple[int, int], ...] = ()
    source: str = ""
    other_s: float = 0.0

    def __post_init__(self):
        if not self.tape_order:
            n = len(self.layers)
            object.__setattr__(self, "tape_order", tuple((i, self.layers[i].grad_bytes) for i in reversed(range(n))))

    @property
    def backward_s(self) -> float:
        return sum(layer.backward_s for layer in self.layers)

    @property
    def grad_bytes(self) -> int:
        return sum(layer.grad_bytes for layer in self.layers)

    def ready_times(self) -> List[float]:
        """Seconds after the start of backprop at which each layer's gradient is ready."""
        out, t = [], 0.0
        for layer in self.layers:
            t += layer.backward_s
            out.append(t)
        return out


def profile_model(cfg: ModelConfig, input_shape: Sequence[int], output_shape: Optional[Sequence[int]] = None,
                  model=None):
    """Build ``cfg``'s model; its summary rows (backprop order) and tape order of variables.

    Returns ``(rows, tape_order, model)``: rows as ``stemnet.models.summarize``; tape_order
    one ``(row index, float32 bytes)`` per ``model.trainable_variables`` entry.
    """
    import numpy as np

    from stemnet.models import backprop_order, build_model, summarize

    model = model if model is not None else build_model(cfg, input_shape, output_shape)
    rows = summarize(model)
    owner = {}
    for i, node in enumerate(backprop_order(model)):
        for v in node.variables:
            owner[id(v)] = i
    tape_order = tuple((owner[id(v)], GRAD_BYTES_PER_PARAM * int(np.prod(v.shape)))
                       for v in model.trainable_variables)
    return rows, tape_order, model


def _update_seconds(params: int, network: Network) -> float:
    return params * ADAM_BYTES_PER_PARAM / (network.memory_bandwidth_gbs * 1e9)


def analytic_workload(rows: Sequence[dict], network: Network, *, batch: int = 1, precision: str = "float32",
                      tape_order: Sequence[Tuple[int, int]] = ()) -> Workload:
    """Compute times from analytic FLOPs: ``flops × batch / (peak × compute_efficiency)``."""
    rate = network.flop_rate(precision)
    layers = tuple(LayerCost(r["name"], int(r["grad_bytes"]), r["flops_bwd"] * batch / rate) for r in rows)
    forward = sum(r["flops_fwd"] for r in rows) * batch / rate
    params = sum(int(r["params"]) for r in rows)
    key = PRECISION_PEAK.get(precision, precision)
    source = (f"analytic: {key} peak {network.peak_tflops[key]:g} TFLOP/s x efficiency "
              f"{network.compute_efficiency:g}, batch {batch}/GPU")
    return Workload(layers, forward, _update_seconds(params, network), tuple(tape_order), source)


def measure_workload(cfg: ModelConfig, input_shape: Sequence[int], output_shape: Optional[Sequence[int]] = None,
                     *, batch: int = 1, repeats: int = 5, network: Optional[Network] = None,
                     probes: int = 0) -> Workload:
    """Compute times measured on this host (float32, TensorFlow's default device).

    Times (median of ``repeats`` after a warm-up) the forward pass, the forward+backward
    pass and an Adam update of the whole model. The backward time (difference) is shared
    out to layers in proportion to their analytic backward FLOPs -- or, with ``probes``
    > 1, measured: at ``probes`` layers spread over the backprop order, the time until
    that layer's gradient is ready is timed as a backward pass that stops there (the
    gradients of it and every layer before it in backprop order, nothing else: TensorFlow
    prunes the rest); between two probes the measured time is shared by FLOPs.
    ``network`` is unused for compute; it is only named in ``source``.
    """
    import tensorflow as tf

    rows, tape_order, model = profile_model(cfg, input_shape, output_shape)
    shape_in = tuple(int(s) for s in model.input_shape[1:])
    x = tf.random.normal((batch, *shape_in))
    targets = {name: tf.random.normal((batch, *[int(s) for s in t.shape[1:]]))
               for name, t in model.output.items()}
    variables = model.trainable_variables
    opt = tf.keras.optimizers.Adam(1e-4)
    opt.build(variables)

    def loss_of(outputs):
        return tf.add_n([tf.reduce_mean(tf.square(outputs[k] - targets[k])) for k in targets])

    @tf.function
    def forward():
        return loss_of(model(x, training=True))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            loss = loss_of(model(x, training=True))
        return tape.gradient(loss, variables)

    grads = [tf.zeros_like(v) for v in variables]

    @tf.function
    def update():
        opt.apply_gradients(zip(grads, variables))

    def run(fn):
        result = fn()
        if result is not None:  # wait for the values: eager ops may still be running
            tf.nest.map_structure(lambda t: t.numpy(), result)

    def timed(fns: dict) -> dict:
        """Median seconds per function, their calls interleaved round-robin, so that a
        change of load on a shared host shifts them all alike (differences are taken)."""
        for fn in fns.values():
            run(fn)  # trace + warm up
        samples = {key: [] for key in fns}
        for _ in range(max(1, repeats)):
            for key, fn in fns.items():
                start = time.perf_counter()
                run(fn)
                samples[key].append(time.perf_counter() - start)
        return {key: statistics.median(values) for key, values in samples.items()}

    fns = {"forward": forward, "forward_backward": forward_backward, "update": update}
    picks = []
    if probes > 1 and len(rows) > 1:
        owners = [owner for owner, _ in tape_order]
        picks = sorted({round((k + 1) * len(rows) / probes) - 1 for k in range(probes - 1)} - {len(rows) - 1})
        for i in picks:
            subset = [v for v, owner in zip(variables, owners) if owner <= i]

            @tf.function
            def partial_backward(subset=subset):
                with tf.GradientTape() as tape:
                    loss = loss_of(model(x, training=True))
                return tape.gradient(loss, subset)

            fns[i] = partial_backward
    times = timed(fns)
    t_fwd, t_fb, t_upd = times["forward"], times["forward_backward"], times["update"]
    backward = max(t_fb - t_fwd, 0.0)
    ready = {len(rows) - 1: backward}  # layer index (backprop order) -> s after backprop starts
    if picks:
        for i in picks:
            ready[i] = max(times[i] - t_fwd, 0.0)
        level = 0.0
        for i in sorted(ready):  # readiness cannot go backwards: noise is clipped
            level = ready[i] = min(max(ready[i], level), backward)
    costs, start, before = [], 0, 0.0
    for end in sorted(ready):
        weights = [r["flops_bwd"] for r in rows[start:end + 1]]
        weights = weights if sum(weights) > 0 else [1] * len(weights)
        costs += [(ready[end] - before) * w / sum(weights) for w in weights]
        start, before = end + 1, ready[end]
    layers = tuple(LayerCost(r["name"], int(r["grad_bytes"]), c) for r, c in zip(rows, costs))
    where = f" (network of {network.description or 'the machine'})" if network is not None else ""
    how = (f"measured at {len(ready)} layers, shared by FLOPs between them" if len(ready) > 1
           else "apportioned by backward FLOPs")
    source = (f"measured on this host: forward {t_fwd * 1e3:.3g} ms, backward {backward * 1e3:.3g} ms "
              f"{how}, batch {batch}/GPU, float32{where}")
    return Workload(layers, t_fwd, t_upd, tape_order, source)
