"""The registry: MLflow runs and metrics (`tracking`), model versions (`registry`), aliases with
a lock, compare-and-set and an audit trail (`aliases`), the lifecycle of runs and versions
(`lifecycle`: skips, pending registrations, retention), export, the pyfunc flavour and the run's
report (`report`)."""

from ..exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "tracking": ["start_run", "log_metrics", "metric_logger", "replay_kept_points", "run_url"],
    "registry": ["VersionInfo", "register_version", "get_version", "resolve_version", "describe_version"],
    "aliases": ["promote_version", "rollback_champion", "move_alias", "alias_history"],
    "lifecycle": ["RunResult", "repeated_version", "apply_retention"],
    "export": ["export_adapter", "export_merged"],
    "report": ["write_report", "summary_markdown"],
})
