"""The weight-decay replicate sweep (EXPERIMENTS.md section 2) as a study.

784-500(relu)-300(relu)-10 trained with plain SGD; L2 weight decay on the first hidden kernel
(or on all of them); one child run per (factor, replicate). Replicate ``r`` of every factor
starts from the same seed, so factors are compared on equal footing, and all runs share one
train/validation split.
"""

from __future__ import annotations

from mnist_mlflow.config import DataConfig, DenseModelConfig, DenseRunConfig, TrainingConfig, WeightDecayConfig

HIDDEN_UNITS = (500, 300)
# LeCun's MNIST table: "3-layer NN, 500+300 HU, softmax, cross entropy, weight decay",
# 1.53% test error (Hinton, 2005).
LECUN_TABLE_ACCURACY = 0.9847


def replicate_seed(config: WeightDecayConfig, replicate: int) -> int:
    """The training seed of replicate ``replicate`` (0-based), the same for every factor."""
    return config.seed + replicate


def child_config(config: WeightDecayConfig, factor: float, replicate: int) -> DenseRunConfig:
    return DenseRunConfig(
        model=DenseModelConfig(
            hidden_units=HIDDEN_UNITS,
            activations=("relu",) * len(HIDDEN_UNITS),
            l2_factor=factor,
            regularized_layers=config.regularized_layers,
        ),
        training=TrainingConfig(
            optimizer="sgd",
            learning_rate=config.learning_rate,
            batch_size=config.batch_size,
            epochs=config.epochs,
            seed=replicate_seed(config, replicate),
        ),
        data=DataConfig(seed=config.seed, max_train_examples=config.max_train_examples),
    )


def describe(config: WeightDecayConfig) -> str:
    layers = "the first hidden kernel" if config.regularized_layers == "first" else "every hidden kernel"
    return (
        f"Weight-decay replicate sweep (EXPERIMENTS.md section 2). Varies: the L2 factor on {layers} "
        f"({len(config.factors)} factors). Repeats: {config.replicates} replicate networks per factor, "
        f"replicate r seeded {config.seed}+r for every factor. Holds fixed: 784-500-300-10 relu, SGD "
        f"learning rate {config.learning_rate:g}, batch {config.batch_size}, {config.epochs} epochs, "
        f"the split (seed {config.seed})."
    )


def run_weight_decay(config: WeightDecayConfig):
    """Trains every (factor, replicate) as a child of one parent run and logs the sweep's summary.

    Returns the :class:`mnist_mlflow.studies.StudyResult`.
    """
    from mnist_mlflow import studies, summaries

    study_id = config.sweep_id or studies.new_study_id("weight_decay")
    children = [
        studies.ChildSpec(
            key=f"factor={factor:.10g}/replicate={replicate}",
            run_name=f"wd-l2={factor:.3g}-r{replicate}",
            config=child_config(config, factor, replicate),
            tags={"weight_decay_factor": f"{factor:.10g}", "replicate": str(replicate)},
            params={"replicate": replicate, "replicate_seed": replicate_seed(config, replicate)},
            description=f"Weight-decay factor {factor:g}, replicate {replicate} (replicates are numbered from 0 to {config.replicates - 1}).",
        )
        for factor in config.factors
        for replicate in range(config.replicates)
    ]
    spec = studies.StudySpec(
        kind="weight_decay",
        study_id=study_id,
        run_name=f"weight-decay-{study_id.rsplit('-', 1)[-1]}",
        params={**config.as_params(), "sweep_id": study_id},
        description=describe(config),
    )
    return studies.run_study(
        spec, children, lambda parent, outcomes: summaries.log_weight_decay_summary(parent, outcomes, config.factors)
    )
