"""How a search draws its trials and prunes them: Optuna's samplers and pruners, seeded per trial."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import optuna

from mnist_mlflow.studies.search_spaces import SearchSpace

# Median pruning: judge no trial before 5 have finished, and none before its third epoch.
PRUNER_STARTUP_TRIALS = 5
PRUNER_WARMUP_EPOCHS = 2
# Successive halving and Hyperband keep the best third of the trials at each rung (Optuna's
# and the papers' default factor). A trial reports epoch k as Optuna's step k - 1, and Optuna
# judges rung r at step min_resource * 3**r: with a minimum of 1, after epochs 2, 4 and 10.
# The course's trials learn most of what they will in their first epochs.
HALVING_FACTOR = 3
HALVING_MIN_RESOURCE = 1
# TPE's settings, all stated. Optuna 5 turned on multivariate TPE (one joint model of the
# parameters, rather than one per parameter) and the constant liar (a running trial counts as a
# poor result, so parallel workers spread out) by default (optuna#6746, #6738); Optuna 4.x left
# both off. requirements.txt allows both series, so the same sampler=tpe command would draw other
# trials under each. Stated here, a search draws the same trials under 4.9 and 5.x; Optuna 5's
# choices are kept, as the better defaults for a search spread over several workers.
TPE_SETTINGS = {"n_startup_trials": 10, "multivariate": True, "constant_liar": True, "group": False}


def sampler_settings(name: str) -> dict[str, object]:
    """The sampler's effective settings, recorded on the search's parent run."""
    settings: dict[str, object] = {"optuna_version": optuna.__version__}
    if name == "tpe":
        settings.update({f"tpe_{key}": value for key, value in TPE_SETTINGS.items()})
    return settings


def make_sampler(name: str, space: SearchSpace, seed: int):
    """Optuna's grid, random or TPE sampler. Random and TPE draw trial k from a generator seeded
    with (seed, k), so a trial's parameters do not depend on which worker runs it or when."""
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "random":
        return TrialSeededSampler(seed, lambda trial_seed: optuna.samplers.RandomSampler(seed=trial_seed))
    return TrialSeededSampler(seed, lambda trial_seed: _tpe_sampler(trial_seed))


def _tpe_sampler(seed: int) -> optuna.samplers.TPESampler:
    with warnings.catch_warnings():
        # Optuna 4.x calls multivariate TPE and the constant liar experimental; Optuna 5 made them the default.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, **TPE_SETTINGS)


def _trial_seed(seed: int, trial_number: int) -> int:
    return int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """An Optuna sampler whose draws for trial k come from a sampler seeded with (seed, k).

    Optuna's samplers draw from one generator per process, so which values trial k gets would
    depend on which worker runs it and what that worker drew before. This wrapper makes a fresh
    sampler (random or TPE, through ``make``) for each trial, seeded from the trial's number,
    and hands it every call. TPE keeps no state of its own between trials: it reads the
    finished trials from the study. Only Optuna's public sampler interface is used.
    """

    def __init__(self, seed: int, make: Callable[[int], optuna.samplers.BaseSampler]) -> None:
        self.base_seed = seed
        self._make = make
        self._samplers: dict[int, optuna.samplers.BaseSampler] = {}

    def _for(self, trial) -> optuna.samplers.BaseSampler:
        if trial.number not in self._samplers:
            self._samplers[trial.number] = self._make(_trial_seed(self.base_seed, trial.number))
        return self._samplers[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        sampler = self._samplers.pop(trial.number, None)
        if sampler is not None:
            sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing to reseed: every trial's sampler is seeded from its number."""


def make_pruner(name: str, epochs: int):
    """Optuna's pruner ``name`` for trials of ``epochs`` epochs, each reported at steps 0 to epochs - 1.

    - ``median``: stops a trial below the median of the finished trials at the same epoch.
    - ``successive_halving`` (asynchronous, ASHA): after epochs 2, 4 and 10, a trial goes on
      only if it is in the best third of the trials that reached that rung.
    - ``hyperband``: several successive-halving brackets, from aggressive to none (for 10 epochs:
      rungs after epochs 2, 4, 10; after 4, 10; after 10), each trial in one bracket chosen from
      its number; it hedges against a first rung that judges too early.

    No pruner judges a trial's last epoch (``search_objective.EpochReporter``).
    """
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=HALVING_MIN_RESOURCE, reduction_factor=HALVING_FACTOR, min_early_stopping_rate=0
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=HALVING_MIN_RESOURCE, max_resource=epochs, reduction_factor=HALVING_FACTOR
        )
    return optuna.pruners.NopPruner()
