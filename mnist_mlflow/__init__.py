"""mnist-mlflow: MNIST and Fashion-MNIST exercises as tracked, comparable, servable MLflow runs."""

import os

# TensorFlow's C++ start-up chatter (no GPU found, CPU features) hides the useful output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
