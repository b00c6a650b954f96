"""Ray Tune ablation sweeps over `distributed_asac.pipeline.run`, logged to MLflow (see tune/README.md).

Ray is imported only in `tune.runner`; the other modules (sweep files, base cache, trial body, records,
report) run without it, so tests and `--dry-run` / `--report` never start a cluster.
"""
