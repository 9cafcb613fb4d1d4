"""ASHA whose rung records survive an interrupted sweep.

``Tuner.restore`` brings back the trials and the searcher, but the scheduler comes back as it was
pickled when the sweep began: with empty rungs. A resumed sweep would then compare the trials still
to run against none of the finished ones, and stop nothing until enough new trials have reached each
rung. This scheduler writes its state next to the experiment whenever a rung records a result, and a
restored sweep reads it back before its first trial is added.
"""
from __future__ import annotations

import pickle

from ray.tune.schedulers import ASHAScheduler

from components.data.storage import exists, open_fs, read_bytes, write_bytes

STATE_FILE = "asha_state.pkl"

# what this class adds to the scheduler's attributes: where to save, not part of the saved state
_OWN = ("_state_uri", "_storage", "_loaded", "_recorded")


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` saving its rungs to ``state_uri`` (local path or s3://) as they fill."""

    def __init__(self, state_uri: str, storage: dict | None = None, **asha):
        super().__init__(**asha)
        self._state_uri, self._storage = state_uri, storage or {}
        self._loaded, self._recorded = False, 0

    def on_trial_add(self, tune_controller, trial):
        if not self._loaded:  # the first trial of a run, new or restored
            self._loaded = True
            if exists(self._state_uri, self._storage):
                own = {k: getattr(self, k) for k in _OWN}
                self.__dict__.update(pickle.loads(read_bytes(self._state_uri, self._storage)))
                self.__dict__.update(own)
                self._recorded = self.recorded()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        self._save_if_recorded()
        return decision

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._save_if_recorded()

    def recorded(self) -> int:
        """How many (trial, rung) results the rungs hold."""
        return sum(len(seen) for bracket in self._brackets for _, seen in bracket._rungs)

    def _save_if_recorded(self):
        n = self.recorded()
        if n != self._recorded:
            self._recorded = n
            state = {k: v for k, v in self.__dict__.items() if k not in _OWN}
            write_bytes(self._state_uri, pickle.dumps(state), self._storage)

    def forget(self):
        """Drop a saved state: a sweep started afresh under a name used before must not inherit its rungs."""
        fs, path = open_fs(self._state_uri, self._storage)
        if fs.exists(path):
            fs.rm(path)
