"""The loss-spike guard (train/spikes.py): what counts as a spike, on the loss sequences runs produce."""
from __future__ import annotations

import math

import numpy as np

from openllm_ds.train import spikes
from openllm_ds.train.checkpointing import TrainState
from openllm_ds.train.spikes import SpikeGuard


def run(losses, factor=2.0, patience=3):
    guard, state = SpikeGuard(factor, patience), TrainState()
    for step, loss in enumerate(losses, 1):
        state.step = step
        guard.observe(state, loss)
        if guard.tripped:
            return step, state
    return None, state


def test_batches_that_differ_by_nature_are_no_spike(monkeypatch):
    # a fine-tune's length buckets: copy-drill batches near 0, answer batches about 2, in runs of a few
    rng = np.random.default_rng(0)
    losses = [float(rng.uniform(0.02, 0.3) if rng.random() < 0.5 else rng.uniform(1.7, 2.6)) for _ in range(3000)]
    assert run(losses)[0] is None
    monkeypatch.setattr(spikes, "SPREAD", 0.0)  # the factor alone would have tripped on them
    assert run(losses)[0] is not None


def test_a_spike_trips_the_guard_whatever_the_batches():
    rng = np.random.default_rng(1)
    smooth = [4.0 - 0.001 * i + float(rng.normal(0, 0.05)) for i in range(200)]  # pretraining
    assert run(smooth + [9.0, 9.5, 8.8])[0] == 203
    assert run(smooth + [9.0, 3.9, 8.8, 9.1])[0] is None  # not in a row
    bimodal = [float(rng.uniform(0.02, 0.3) if i % 2 else rng.uniform(1.7, 2.6)) for i in range(200)]
    step, state = run(bimodal + [7.5, 8.0, 9.0])
    assert step == 203 and 0.8 < state.loss_avg < 1.5 and 0.7 < math.sqrt(state.loss_var) < 1.3
    assert run(bimodal + [float("nan")] * 3)[0] == 203  # non-finite, always
    assert run(smooth + [9.0] * 3, factor=0)[0] is None  # factor 0: non-finite losses only
