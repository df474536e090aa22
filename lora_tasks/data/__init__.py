"""Data: load any supported source, split and fingerprint it (`sources`); the pandera contract,
its report and quarantine (`validation`, `conflicts`); the same contract per batch on Ray Data
(`streaming`); the run's prepared data and identity (`prepare`); the evidence files forgetting
reads (`evidence`); the demo's data (`demo`)."""

from ..exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "sources": ["load_table", "split_train_eval", "sample_rows", "fingerprint", "source_fingerprint"],
    "validation": ["ValidationReport", "ValidationResult", "build_schema", "validate_splits", "enforce_policy"],
    "conflicts": ["Conflicts", "check_no_conflicts", "check_no_duplicates"],
    "prepare": ["PreparedData", "StreamSpec", "prepare_in_memory", "run_dir_for", "lineage_tags", "code_version"],
    "evidence": ["MCQuestion", "check_evidence_files", "read_reference_texts", "read_mc_benchmark"],
    "demo": ["write_demo_data"],
})
