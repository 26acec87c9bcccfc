"""Studies: many runs under one parent run, compared in one summary.

- :mod:`~mnist_mlflow.studies.engine`: the one lifecycle every study runs through;
- :mod:`~mnist_mlflow.studies.protocol`: what a study hands the engine (plain data);
- :mod:`~mnist_mlflow.studies.exercises`, :mod:`~mnist_mlflow.studies.weight_decay`: studies
  whose children come from a list; each module holds its config, its children and its summary;
- :mod:`~mnist_mlflow.studies.search_spaces` (the search's config and spaces) and
  :mod:`~mnist_mlflow.studies.search` (the Optuna study that supplies the search's children);
- :mod:`~mnist_mlflow.studies.summaries`, :mod:`~mnist_mlflow.studies.best_of_n`: pure functions
  over the children's records.

The definition modules (configs and children) import neither TensorFlow nor MLflow, so an
entry point validates its input at once; they reach the engine only when a study runs.
"""
