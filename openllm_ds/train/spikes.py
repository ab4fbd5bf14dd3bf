"""Loss-spike detection: the signal that rolls a run back to its last good checkpoint.

A step is *bad* when its loss is non-finite, or above both ``spike_factor`` x the running average of the
good steps before it and that average plus ``SPREAD`` running standard deviations. The second bound keeps
losses that vary from batch to batch by their nature from counting as spikes: a fine-tune's length-bucketed
batches hold either short copy drills (loss near 0 once learned) or SQuAD answers (loss about 2), so three
answer batches in a row sit at twice the average without anything going wrong; pretraining's losses vary
little, and there the factor is the bound. ``spike_steps`` bad steps in a row trip the guard; the loop then
reloads the last checkpoint saved before them and skips every batch from that checkpoint through the bad steps
(as PaLM did: the data that led into a spike is not replayed). The running average and variance live in
the train state, so a resumed run judges its steps exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math

from openllm_ds.train.checkpointing import TrainState

AVERAGE_DECAY = 0.95  # exponential running average (and variance) over roughly the last 20 good steps
SPREAD = 3.0  # running standard deviations above the average that a bad step's loss must also exceed


class SpikeGuard:
    def __init__(self, spike_factor: float, spike_steps: int):
        self.factor, self.patience = spike_factor, spike_steps
        self.streak: list[float] = []  # losses of the current run of bad steps

    def observe(self, state: TrainState, loss: float) -> bool:
        """Record this step's loss; True when it is bad. Good steps update ``state.loss_avg`` and ``loss_var``."""
        avg, var = state.loss_avg, state.loss_var or 0.0
        bad = not math.isfinite(loss) or (self.factor > 0 and avg is not None
                                          and loss > max(self.factor * avg, avg + SPREAD * math.sqrt(var)))
        if bad:
            self.streak.append(loss)
        else:
            self.streak = []
            if avg is None:
                state.loss_avg, state.loss_var = loss, 0.0
            else:  # exponentially weighted mean and variance
                delta = loss - avg
                state.loss_avg = avg + (1 - AVERAGE_DECAY) * delta
                state.loss_var = AVERAGE_DECAY * (var + (1 - AVERAGE_DECAY) * delta * delta)
        return bad

    @property
    def tripped(self) -> bool:
        return len(self.streak) >= self.patience

    def describe(self, state: TrainState) -> str:
        n = len(self.streak)
        losses = ", ".join(f"{x:.4g}" for x in self.streak)
        avg = (f"{state.loss_avg:.4g} +- {math.sqrt(state.loss_var or 0.0):.3g}" if state.loss_avg is not None
               else "none yet")
        return (f"steps {state.step - n + 1}-{state.step} had non-finite or spiking losses ({losses}; running "
                f"average {avg}, train.spike_factor={self.factor}, train.spike_steps={self.patience})")

    def reset(self) -> None:
        self.streak = []
