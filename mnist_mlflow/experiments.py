"""One tracked training run from a validated config: the glue between the library's parts.

Order matters for a good user experience: the config is already validated; then the tracking
server is checked (seconds), then the data is loaded, and only then is a run started. A
failure before training therefore creates no run when the script is started directly.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mnist_mlflow import data, evaluation, models, plots, tracking, training
from mnist_mlflow.config import CnnRunConfig, DataConfig, DenseRunConfig, TrainingConfig

NUM_EXAMPLE_IMAGES = 5


@dataclass
class RunResult:
    """What a tracked run returns: its id, its summary metrics and where its model lives."""

    run_id: str
    metrics: dict[str, float]
    model_uri: str
    registered_version: str | None = None


def _training_name(training: TrainingConfig, dropout_rate: float) -> str:
    """The run-name suffix for optimizer, learning rate (and schedule), batch size and dropout."""
    name = f"-{training.optimizer}-lr{training.learning_rate:g}"
    if training.lr_schedule != "constant":
        name += f"-{training.lr_schedule}"
    name += f"-bs{training.batch_size}"
    if training.max_shift:
        name += f"-shift{training.max_shift}"
    if dropout_rate:
        name += f"-drop{dropout_rate:g}"
    return name


def dense_run_name(config: DenseRunConfig) -> str:
    model = config.model
    activations = model.activations[0] if len(set(model.activations)) == 1 else "-".join(model.activations)
    name = f"dense-{'x'.join(map(str, model.hidden_units))}-{activations}"
    name += _training_name(config.training, model.dropout_rate)
    if model.l2_factor:
        name += f"-l2{model.l2_factor:g}" + ("-first" if model.regularized_layers == "first" else "")
    return name


def _placement(
    run_name: str, tags: dict[str, str], params: dict[str, Any], study: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The run's name, tags and params, with a study's additions (see the ``study`` argument of run_dense)."""
    if study is None:
        return {"run_name": run_name, "tags": tags, "params": params}
    return {
        "run_name": study["run_name"],
        "tags": {**tags, **study["tags"]},
        "params": {**params, **study["params"]},
        "parent_run_id": study["parent_run_id"],
        "description": study["description"],
    }


def run_dense(
    config: DenseRunConfig, study: Mapping[str, Any] | None = None, callbacks: Sequence[Any] = ()
) -> RunResult:
    """Trains the dense network ``config`` describes and records everything in MLflow.

    With ``study``, the run is a child of a study's parent run: a mapping with the keys
    ``parent_run_id``, ``run_name``, ``tags``, ``params`` and ``description`` (built by
    :func:`mnist_mlflow.studies.engine.train_child`). ``callbacks`` are extra Keras
    callbacks for the fit (say, a search's pruning callback).
    """
    return run_classifier(
        build_model=lambda: models.build_dense_model(
            config.model.hidden_units,
            config.model.activations,
            dropout_rate=config.model.dropout_rate,
            l2_factor=config.model.l2_factor,
            regularized_layers=config.model.regularized_layers,
        ),
        training_config=config.training,
        data_config=config.data,
        callbacks=callbacks,
        **_placement(
            dense_run_name(config), {"entry_point": "dense", "model_family": "dense"}, config.as_params(), study
        ),
    )


def cnn_run_name(config: CnnRunConfig) -> str:
    model = config.model
    pools = "" if all(model.pooling) else "-pool" + "".join("1" if flag else "0" for flag in model.pooling)
    dense = "x".join(map(str, model.dense_units)) or "none"
    name = f"cnn-{'-'.join(map(str, model.filters))}-k{model.kernel_size}{pools}-dense{dense}"
    if models.resolve_precision(model.precision) == "bfloat16":
        name += "-bf16"
    return name + _training_name(config.training, model.dropout_rate)


def run_cnn(config: CnnRunConfig, study: Mapping[str, Any] | None = None) -> RunResult:
    """Trains the convolutional network ``config`` describes, records it and optionally registers it.

    With ``study``, the run is a child of a study's parent run (see :func:`run_dense`).
    """
    return run_classifier(
        build_model=lambda: models.build_cnn_model(
            config.model.filters,
            kernel_size=config.model.kernel_size,
            pooling=config.model.pooling,
            dense_units=config.model.dense_units,
            dropout_rate=config.model.dropout_rate,
            precision=config.model.precision,
        ),
        training_config=config.training,
        data_config=config.data,
        register_as=config.register_as or None,
        **_placement(cnn_run_name(config), {"entry_point": "cnn", "model_family": "cnn"}, config.as_params(), study),
    )


def run_config(
    config: DenseRunConfig | CnnRunConfig, study: Mapping[str, Any] | None = None, callbacks: Sequence[Any] = ()
) -> RunResult:
    """Trains and records the model of a dense or a cnn config."""
    if isinstance(config, CnnRunConfig):
        if callbacks:
            raise ValueError("run_config: extra callbacks are supported for dense runs only")
        return run_cnn(config, study)
    return run_dense(config, study, callbacks)


def run_classifier(
    build_model: Callable[[], Any],
    training_config: TrainingConfig,
    data_config: DataConfig,
    params: dict[str, Any],
    run_name: str,
    tags: dict[str, str],
    register_as: str | None = None,
    parent_run_id: str | None = None,
    description: str | None = None,
    callbacks: Sequence[Any] = (),
) -> RunResult:
    """Loads data, builds, trains and evaluates a classifier inside one MLflow run.

    With ``register_as``, the selected model becomes a new version of that registered model.
    With ``parent_run_id``, the run is a child of that (study) run; ``description`` is shown
    with the run in the MLflow UI. ``callbacks`` are extra Keras callbacks for the fit.
    """
    # A study's child: the study has checked the server and reconciled the experiment already.
    tracking_uri = (
        tracking.prepare_tracking(tags["entry_point"]) if parent_run_id is None else tracking.tracking_uri_shown()
    )
    splits = data.load_splits(data_config)

    import keras

    # A study trains many models in one process; drop the graphs of the previous ones.
    keras.backend.clear_session()
    # Seeds Python, NumPy and TensorFlow. On CPU this makes runs repeatable without
    # tf.config.experimental.enable_op_determinism(), which would also switch off XLA.
    keras.utils.set_random_seed(training_config.seed)
    model = build_model()
    steps_per_execution = training.steps_per_execution_for(len(splits.train_labels), training_config.batch_size)
    # XLA for every model without dropout (see models.use_xla for the measurements).
    jit_compile = models.use_xla(model)
    total_steps = training_config.epochs * training.steps_per_epoch(
        len(splits.train_labels), training_config.batch_size
    )
    optimizer = models.make_optimizer(
        training_config.optimizer, training_config.learning_rate, training_config.lr_schedule, total_steps
    )
    models.compile_model(model, optimizer, steps_per_execution=steps_per_execution, jit_compile=jit_compile)

    tracking.enable_autolog()
    all_tags = {
        **tags,
        "dataset": splits.dataset,
        "host": platform.node(),
        **tracking.environment_summary(),
    }
    with tracking.start_run(run_name, all_tags, description=description, parent_run_id=parent_run_id) as run_id:
        print(f"MLflow run {run_id} ({run_name}) at {tracking_uri}", flush=True)
        tracking.log_params(
            {
                **params,
                **splits.sizes,
                "trainable_parameters": models.count_trainable_parameters(model),
                "steps_per_execution": steps_per_execution,
                "batches_per_step": training.batches_per_step_for(
                    model, len(splits.train_labels), training_config.batch_size
                ),
                "jit_compile": jit_compile,
                "compute_dtype": "bfloat16" if models.computes_in_bfloat16(model) else "float32",
                "tfds_version": splits.version,
            }
        )
        tracking.log_dataset_splits(splits)
        tracking.log_text(models.summary_text(model), "model_summary.txt")

        result = training.train_and_evaluate(model, splits, training_config, callbacks=callbacks)
        tracking.log_metrics(result.metrics())
        log_evaluation(result, splits)
        model_uri = tracking.log_keras_model(
            models.prepare_for_inference(model), splits.test_images[:NUM_EXAMPLE_IMAGES]
        )
        print(
            f"Selected epoch {result.best_epoch + 1} (step {result.best_epoch}): "
            f"val_accuracy {result.best_val_accuracy:.4f}, "
            f"test_accuracy {result.test_accuracy:.4f}; {result.mean_epoch_time_s:.2f} s per epoch",
            flush=True,
        )
        version = None
        if register_as:
            version = tracking.register_model_version(
                model_uri,
                register_as,
                run_id=run_id,
                val_accuracy=result.best_val_accuracy,
                test_accuracy=result.test_accuracy,
            )
            print(f"Registered as {register_as} version {version}", flush=True)
        if parent_run_id is None:
            tracking.print_runs_view(tracking.current_experiment_id(), run_id)
        return RunResult(run_id=run_id, metrics=result.metrics(), model_uri=model_uri, registered_version=version)


def log_evaluation(result: training.TrainingResult, splits: data.Splits) -> None:
    """Logs the confusion matrix, per-class report and training history of the selected model."""
    matrix = evaluation.confusion_counts(splits.test_labels, result.test_probabilities)
    tracking.log_text(evaluation.confusion_csv(matrix, splits.class_names), "evaluation/confusion_matrix.csv")
    tracking.log_dict(
        evaluation.per_class_report(splits.test_labels, result.test_probabilities, splits.class_names),
        "evaluation/classification_report.json",
    )
    test_view = (splits.test_images, splits.test_labels, result.test_probabilities, splits.class_names)
    for figure, path in (
        (plots.confusion_matrix_figure(matrix, splits.class_names), "evaluation/confusion_matrix.png"),
        (plots.misclassified_figure(*test_view), "evaluation/misclassified.png"),
        (plots.predictions_figure(*test_view), "evaluation/predictions.png"),
        (plots.history_figure(result.history, result.best_epoch), "plots/history.png"),
    ):
        tracking.log_figure(figure, path)
        plots.close(figure)
