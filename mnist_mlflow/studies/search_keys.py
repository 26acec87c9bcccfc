"""The names a search writes into its Optuna study, in one place.

A study's user attributes (``study.user_attrs``) and each trial's (``trial.user_attrs``) are how
the workers of one search share what they know: the parent run, the settings, which trial
repeats which, what each trial measured. Every key is a constant here.
"""

# The study's attributes.
PARENT_ATTR = "mlflow_parent_run_id"
SETTINGS_ATTR = "settings"
TRACKING_ATTR = "mlflow_tracking_uri"

# Each trial's attributes.
SURPLUS_ATTR = "surplus"
DIVERGED_ATTR = "diverged"
SAME_AS_TRIAL_ATTR = "same_as_trial"
WORKER_ATTR = "worker"
RUN_ID_ATTR = "mlflow_run_id"
MODEL_URI_ATTR = "model_uri"
BEST_VAL_ACCURACY_ATTR = "best_val_accuracy"
TEST_ACCURACY_ATTR = "test_accuracy"
BEST_EPOCH_ATTR = "best_epoch"
EPOCHS_TRAINED_ATTR = "epochs_trained"
TRAIN_TIME_ATTR = "train_time_s"
SECONDS_PER_EPOCH_ATTR = "seconds_per_epoch"
PARAMETERS_ATTR = "parameters"

# What a trial with the parameters of an earlier finished trial takes over from it (not its
# epochs or time: it trained nothing).
# The reused trial keeps the twin's seconds per epoch too: in a Pareto study that is its cost.
REUSED_ATTRS = (
    RUN_ID_ATTR,
    MODEL_URI_ATTR,
    BEST_VAL_ACCURACY_ATTR,
    TEST_ACCURACY_ATTR,
    BEST_EPOCH_ATTR,
    SECONDS_PER_EPOCH_ATTR,
    PARAMETERS_ATTR,
)


def trial_key(number: int) -> str:
    """The child key of trial ``number``: its identity among the study's child runs."""
    return f"trial={number}"
