"""The CNN's floor: a bare compiled training step of the same model on one fixed in-memory batch.

No data pipeline, no validation, no callbacks, no tracking: the same network (32-32 conv,
64-64 dense), the same loss and SGD at batch 32, stepping on one batch held in memory. Two
forms are timed and the faster is the floor:
- ``xla``: the project's model (ReshapeMaxPooling2D) as one XLA-compiled step per call;
- ``onednn``: the stock Keras layers as a TensorFlow graph without XLA (oneDNN kernels);
- ``onednn_bfloat16``: the same in bfloat16 mixed precision, where the CPU has bfloat16
  matrix units (what ``precision=auto`` trains with there).
Many steps inside one XLA-compiled loop were tried too: XLA on CPU ran such a loop about ten
times slower per step (49 ms against 3.9 ms), so it is no floor.
Prints one JSON line: seconds per step for each form, and seconds per epoch of 1,688 steps.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mnist_mlflow import models  # noqa: E402

STEPS_PER_EPOCH = 1688
STEPS = 500


def seconds_per_step(model, jit_compile: bool) -> float:
    optimizer = keras.optimizers.SGD(0.1)
    loss_function = keras.losses.SparseCategoricalCrossentropy()
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (32, 28, 28, 1)).astype("float32"))
    labels = tf.constant(rng.integers(0, 10, 32))
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=jit_compile)
    def step():
        with tf.GradientTape() as tape:
            loss = loss_function(labels, model(images, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    step()  # Traces and compiles.
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(STEPS):
            loss = step()
        float(loss)
        samples.append((time.perf_counter() - start) / STEPS)
    return statistics.median(samples)


def main() -> None:
    keras.utils.set_random_seed(0)
    model = models.build_cnn_model((32, 32))
    timings = {
        "xla": seconds_per_step(model, jit_compile=True),
        "onednn": seconds_per_step(models.with_standard_layers(model), jit_compile=False),
    }
    float32_best = min(timings.values())
    if models.cpu_multiplies_bfloat16():
        keras.utils.set_random_seed(0)
        timings["onednn_bfloat16"] = seconds_per_step(
            models.build_cnn_model((32, 32), precision="bfloat16"), jit_compile=False
        )
    best = min(timings.values())
    print(
        json.dumps(
            {
                "s_per_step": timings,
                "s_per_epoch": best * STEPS_PER_EPOCH,
                "s_per_epoch_float32": float32_best * STEPS_PER_EPOCH,
            }
        )
    )


if __name__ == "__main__":
    main()
