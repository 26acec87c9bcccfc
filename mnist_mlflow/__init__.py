"""mnist-mlflow: MNIST and Fashion-MNIST exercises as tracked, comparable, servable MLflow runs.

Layers (every import points down; ``tests/test_structure.py`` finds no cycle):

1. ``config``, ``lifecycle``, ``redaction``: typed configs and errors, signals and process
   identity, URLs without passwords. No TensorFlow, no MLflow.
2. ``data``, ``models``, ``training``, ``evaluation``, ``plots``: the machine learning, with no
   MLflow; and ``tracking``: every MLflow call, split by concern.
3. ``tracked_run``: one tracked training run from a config (a ``RunPlan``), on its own or as a
   study's child.
4. ``studies``: many runs under one parent, through one engine (``studies.engine``); each
   study's module holds its own config, its children and its summary.

Apart: ``cli`` (the entry points' plumbing), ``served_model`` (the file MLflow copies into every
logged model; it imports nothing from here) and ``predict`` (the image client).

Glossary (one word for one idea):

- **run**: one MLflow run. A **tracked run** trains and evaluates one model (``tracked_run``).
- **study**: one parent run with one **child** run per configuration, compared in a **summary**
  on the parent. The exercises, the weight-decay sweep and the search are studies.
- **study id**: the name that identifies a study, stored on its runs as the ``study_id`` tag.
  The entry points call it ``sweep_id`` (exercises, weight_decay) and ``study_name`` (search,
  after Optuna's word for it); both are kept for users' existing commands.
- **child key**: a child's identity within its study (``exercise=4``, ``trial=7``), stored as the
  ``study_child_key`` tag; a resumed study trains only the keys not yet FINISHED.
- **child spec** (``ChildSpec``): a child to train; **child record** (``ChildRecord``): a child as
  MLflow holds it. Summaries are built from records only.
- **trial**: Optuna's word for one child of a search.
- **launcher run**: the run ``mlflow run`` creates before the project's code starts; a study
  makes it its parent.
- **selected epoch**: the epoch with the best validation accuracy, whose weights are kept;
  test scores are reported for it and never used to choose.
- **champion**: the registry alias ``promote`` points at the best version of a model.
"""

import os
import warnings

# Python shows deprecation warnings only for code run as __main__. Show those the project's own
# modules trigger, once each: they announce a library change before it breaks a run.
warnings.filterwarnings("default", category=DeprecationWarning, module=r"mnist_mlflow(\.|$)")
warnings.filterwarnings("default", category=FutureWarning, module=r"mnist_mlflow(\.|$)")

# TensorFlow's C++ start-up chatter (no GPU found, CPU features) hides the useful output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
