"""mnist-mlflow: MNIST and Fashion-MNIST exercises as tracked, comparable, servable MLflow runs."""

import os
import warnings

# Python shows deprecation warnings only for code run as __main__. Show those the project's own
# modules trigger, once each: they announce a library change before it breaks a run.
warnings.filterwarnings("default", category=DeprecationWarning, module=r"mnist_mlflow(\.|$)")
warnings.filterwarnings("default", category=FutureWarning, module=r"mnist_mlflow(\.|$)")

# TensorFlow's C++ start-up chatter (no GPU found, CPU features) hides the useful output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
