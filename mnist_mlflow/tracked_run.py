"""One tracked training run from a validated config: the glue between the library's parts.

A run is planned first (:class:`RunPlan`: the model to build, how to train it, and where the
run goes), then made by :func:`run_standalone` (the ``dense`` and ``cnn`` entry points) or by
:func:`run_study_child` (the study engine, which has checked the server and made the parent).

Order matters for a good user experience: the config is already validated; then the tracking
server is checked, then the data is loaded, and only then is a run started. A failure before
training therefore creates no run when the script is started directly.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mnist_mlflow import data, evaluation, models, plots, tracking, training
from mnist_mlflow.config import CnnRunConfig, DataConfig, DenseRunConfig, TrainingConfig

NUM_EXAMPLE_IMAGES = 5


@dataclass(frozen=True)
class StudyPlacement:
    """Where a study's child run goes: under the parent, with the study's name, tags and params."""

    parent_run_id: str
    run_name: str
    tags: Mapping[str, str]
    params: Mapping[str, Any]
    description: str


# A killed run to go on from (tracking.session decides whether it can be).
ResumeFrom = tracking.ResumeFrom


@dataclass(frozen=True)
class RunPlan:
    """One tracked run to make: how to build and train its model, and what the run records."""

    build_model: Callable[[], Any]
    training: TrainingConfig
    data: DataConfig
    run_name: str
    tags: Mapping[str, str]
    params: Mapping[str, Any]
    register_as: str | None = None
    parent_run_id: str | None = None
    description: str | None = None
    callbacks: Sequence[Any] = ()
    # The config's own parameters (a study child's params add the study's): the work a killed
    # run must have done to be resumed.
    work_params: Mapping[str, Any] = field(default_factory=dict)
    resume: ResumeFrom | None = None


@dataclass
class RunResult:
    """What a tracked run returns: its id, its summary metrics and where its model lives."""

    run_id: str
    metrics: dict[str, float]
    model_uri: str
    registered_version: str | None = None
    trainable_parameters: int = 0
    # What another epoch costs: the median epoch after the first (training.TrainingResult).
    steady_epoch_time_s: float = 0.0


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


def cnn_run_name(config: CnnRunConfig) -> str:
    model = config.model
    pools = "" if all(model.pooling) else "-pool" + "".join("1" if flag else "0" for flag in model.pooling)
    dense = "x".join(map(str, model.dense_units)) or "none"
    name = f"cnn-{'-'.join(map(str, model.filters))}-k{model.kernel_size}{pools}-dense{dense}"
    if models.resolve_precision(model.precision) == "bfloat16":
        name += "-bf16"
    return name + _training_name(config.training, model.dropout_rate)


def plan_run(
    config: DenseRunConfig | CnnRunConfig, study: StudyPlacement | None = None, callbacks: Sequence[Any] = ()
) -> RunPlan:
    """The run of a dense or cnn config: a run of its own, or, with ``study``, a study's child.

    ``callbacks`` are extra Keras callbacks for the fit (say, a search's pruning callback).
    """
    model = config.model
    if isinstance(config, CnnRunConfig):
        family, run_name, register_as = "cnn", cnn_run_name(config), config.register_as or None

        def build_model():
            return models.build_cnn_model(
                model.filters,
                kernel_size=model.kernel_size,
                pooling=model.pooling,
                dense_units=model.dense_units,
                dropout_rate=model.dropout_rate,
                precision=model.precision,
            )
    else:
        family, run_name, register_as = "dense", dense_run_name(config), None

        def build_model():
            return models.build_dense_model(
                model.hidden_units,
                model.activations,
                dropout_rate=model.dropout_rate,
                l2_factor=model.l2_factor,
                regularized_layers=model.regularized_layers,
            )

    plan = RunPlan(
        build_model=build_model,
        training=config.training,
        data=config.data,
        run_name=run_name,
        tags={"entry_point": family, "model_family": family},
        params=config.as_params(),
        register_as=register_as,
        callbacks=tuple(callbacks),
        work_params=config.as_params(),
    )
    if study is None:
        return plan
    return replace(
        plan,
        run_name=study.run_name,
        tags={**plan.tags, **study.tags},
        params={**plan.params, **study.params},
        parent_run_id=study.parent_run_id,
        description=study.description,
    )


def run_standalone(config: DenseRunConfig | CnnRunConfig, callbacks: Sequence[Any] = ()) -> RunResult:
    """A run of its own: checks the tracking server and closes the experiment's dead runs first,
    offers the experiment's newest killed run of this entry point for resuming (the session
    resumes it only if it did the same work), and ends by printing how to open the run in the
    MLflow UI."""
    plan = plan_run(config, callbacks=callbacks)
    tracking.prepare_tracking(plan.tags["entry_point"])
    if config.training.checkpoint:
        killed = tracking.killed_with_checkpoint(plan.tags["entry_point"], tracking.current_experiment_id())
        plan = replace(plan, resume=ResumeFrom(killed.info.run_id) if killed is not None else None)
    result = make_run(plan)
    tracking.print_runs_view(tracking.current_experiment_id(), result.run_id)
    return result


def run_study_child(
    config: DenseRunConfig | CnnRunConfig,
    study: StudyPlacement,
    callbacks: Sequence[Any] = (),
    resume: ResumeFrom | None = None,
) -> RunResult:
    """A child run of a study, under its parent (the engine has checked the server already);
    with ``resume``, from that killed run's checkpoint."""
    return make_run(replace(plan_run(config, study, callbacks), resume=resume))


def run_dense(config: DenseRunConfig, callbacks: Sequence[Any] = ()) -> RunResult:
    """Trains the dense network ``config`` describes and records everything in MLflow."""
    return run_standalone(config, callbacks)


def run_cnn(config: CnnRunConfig) -> RunResult:
    """Trains the convolutional network ``config`` describes, records it and optionally registers it."""
    return run_standalone(config)


def build_and_compile(plan: RunPlan, num_train_examples: int):
    """The plan's model, seeded and compiled; returns it with its steps per execution and
    whether XLA compiles it."""
    import keras

    training_config = plan.training
    # A study trains many models in one process; drop the graphs of the previous ones.
    keras.backend.clear_session()
    # Seeds Python, NumPy and TensorFlow. On CPU this makes runs repeatable without
    # tf.config.experimental.enable_op_determinism(), which would also switch off XLA.
    keras.utils.set_random_seed(training_config.seed)
    model = plan.build_model()
    steps_per_execution = training.steps_per_execution_for(num_train_examples, training_config.batch_size)
    # XLA for every model without dropout (see models.use_xla for why).
    jit_compile = models.use_xla(model)
    total_steps = training_config.epochs * training.steps_per_epoch(num_train_examples, training_config.batch_size)
    optimizer = models.make_optimizer(
        training_config.optimizer, training_config.learning_rate, training_config.lr_schedule, total_steps
    )
    models.compile_model(model, optimizer, steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    return model, steps_per_execution, jit_compile


def make_run(plan: RunPlan) -> RunResult:
    """Loads data, builds, trains and evaluates a classifier inside one MLflow run.

    With ``plan.register_as``, the selected model becomes a new version of that registered
    model. With ``plan.parent_run_id``, the run is a child of that (study) run; its
    ``description`` is shown with the run in the MLflow UI. Everything that keeps the run
    alive (its lease, checkpoints, resume and end) is the session's (tracking.RunSession).
    """
    splits = data.load_splits(plan.data)
    tags = {**plan.tags, "dataset": splits.dataset, "host": platform.node(), **tracking.environment_summary()}
    placement = tracking.RunPlacement(plan.run_name, tags, plan.description, plan.parent_run_id)
    with tracking.RunSession(placement, work_fingerprint(plan, splits, tags), plan.resume) as session:
        model, steps_per_execution, jit_compile = build_and_compile(plan, len(splits.train_labels))
        datasets = log_run_setup(plan, splits, model, steps_per_execution, jit_compile)
        result = training.train_and_evaluate(
            model, splits, plan.training, callbacks=plan.callbacks, durability=session.durability()
        )
        session.check()
        return record_result(plan, session.run_id, model, result, splits, datasets)


def work_fingerprint(plan: RunPlan, splits: data.Splits, tags: Mapping[str, str]) -> tracking.Fingerprint:
    """What the run's work depends on: its parameters, this project's, TensorFlow's and Keras's
    versions, and the data's digest."""
    import mnist_mlflow

    parts = {
        "parameters": tracking.Fingerprint.digest_of({name: str(value) for name, value in plan.work_params.items()}),
        "project": mnist_mlflow.__version__,
        "tensorflow": tags["tensorflow_version"],
        "keras": tags["keras_version"],
        "data": data.digest_of(splits),
    }
    return tracking.Fingerprint(parts, plan.work_params)


def log_run_setup(plan: RunPlan, splits: data.Splits, model, steps_per_execution: int, jit_compile: bool):
    """Logs the run's parameters, data sets and model summary; returns the data sets by context."""
    batch_size = plan.training.batch_size
    tracking.log_params(
        {
            **plan.params,
            **splits.sizes,
            "trainable_parameters": models.count_trainable_parameters(model),
            "steps_per_execution": steps_per_execution,
            "batches_per_step": training.batches_per_step_for(model, len(splits.train_labels), batch_size),
            "jit_compile": jit_compile,
            "compute_dtype": "bfloat16" if models.computes_in_bfloat16(model) else "float32",
            "tfds_version": splits.version,
        }
    )
    datasets = tracking.log_dataset_splits(splits)
    tracking.log_text(models.summary_text(model), "model_summary.txt")
    return datasets


def record_result(plan: RunPlan, run_id: str, model, result: training.TrainingResult, splits, datasets) -> RunResult:
    """Logs the fit's summary, evaluation and model (and registers it), and says what was selected."""
    summary_time_ms = tracking.log_run_metrics(run_id, result.metrics(), step=0)
    log_evaluation(result, splits)
    model_uri = tracking.log_keras_model(
        models.prepare_for_inference(model),
        splits.test_images[:NUM_EXAMPLE_IMAGES],
        name=plan.run_name,
        # The step after the last epoch, which holds no metric point for MLflow to link.
        step=plan.training.epochs,
    )
    tracking.link_metrics_to_model(
        model_uri.rsplit("/", 1)[-1], datasets, result.metrics(), summary_time_ms, result.best_epoch
    )
    print(
        f"Selected epoch {result.best_epoch + 1} (step {result.best_epoch}): "
        f"val_accuracy {result.best_val_accuracy:.4f}, "
        f"test_accuracy {result.test_accuracy:.4f}; {result.mean_epoch_time_s:.2f} s per epoch",
        flush=True,
    )
    version = None
    if plan.register_as:
        version = tracking.register_model_version(
            model_uri,
            plan.register_as,
            run_id=run_id,
            val_accuracy=result.best_val_accuracy,
            test_accuracy=result.test_accuracy,
        )
        print(f"Registered as {plan.register_as} version {version}", flush=True)
    return RunResult(
        run_id=run_id,
        metrics=result.metrics(),
        model_uri=model_uri,
        registered_version=version,
        trainable_parameters=models.count_trainable_parameters(model),
        steady_epoch_time_s=result.steady_epoch_time_s,
    )


def validation_split(params: Mapping[str, str]):
    """The validation split that a run with these parameters used: (images, labels, data set name).
    ``promote`` evaluates a model on it again before it becomes the champion."""
    config = DataConfig(
        dataset=params.get("dataset", "mnist"),
        validation_fraction=float(params.get("validation_fraction", 0.1)),
        seed=int(params.get("seed", 0)),
    )
    splits = data.load_splits(config)
    return splits.validation_images, splits.validation_labels, f"{splits.dataset}-validation"


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
