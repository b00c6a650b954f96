"""The mitigations users reach for beside ASAC (issue 22), each a row of `rows.MODES` in a module of its own:
group-balanced resampling, GroupDRO, last-layer retraining (DFR) and JTT (docs/mitigations.md). Importing this
package registers them, in this order (the table's), after the rows of rows.py; config.py imports it."""

from . import resample, group_dro, dfr, jtt  # noqa: F401  (isort: skip) registration order is table order
