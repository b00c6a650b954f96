"""Ray Tune ablation sweeps over `distributed_asac.pipeline.run`, logged to MLflow (see tune/README.md).

sweep (the command) → spec (the sweep file and its trials) → trials (running them: jobs, base models, Ray)
→ records (trial records, the sweep folder, MLflow runs) → report (tables, claims.py, between.py, plots). Ray is
imported only by the functions of `trials` that start it, so tests and `--dry-run` / `--report` never start a
cluster.
"""
