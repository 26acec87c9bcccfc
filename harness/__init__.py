"""Test and benchmark infrastructure: real servers (MLflow, model serving, PostgreSQL) started on
loopback and stopped after. Shared by `tests/` and `benchmarks/`; not part of the installed
library, and never imported by it."""
