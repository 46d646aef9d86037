"""The model registry (no Dagster import): which adapter version of each advisor is active, and why.

- `versions.py`: the rows (`model_versions`, `deployments` in our state DB) and the immutable version folders;
  `active_version(engine, advisor) -> Version | None` is what the service and the nightly re-check read.
- `pointer.py`: the app-facing symlink `models/<advisor>-active`, switched atomically, repaired from the rows.
- `evidence.py`: what a decision rests on: the candidate's report, the active version's outcomes (cached).
- `decisions.py`: `deploy_candidate` (promote or reject, recorded), `rollback`, `pin`, `unpin`, retention.
- `status.py`: per-advisor summary for `mondrian-assets status`.
"""
