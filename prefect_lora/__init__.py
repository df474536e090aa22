"""prefect-lora: scheduled LoRA retraining on Prefect, Ray Train and MLflow, gated against the base.

The public face, imported lazily (a name loads its module on first use, so `import prefect_lora`
costs nothing and the gate's pure functions load no model code):

- flows: `retrain` (one config: validate, train, evaluate, register, gate), `retrain_fleet` and
  `watch_fleet` (many adapters of one base), `register_run` (finish a held or interrupted run),
  `promote` and `rollback` (audited moves of the champion alias);
- the Prefect tasks `retrain` is made of, to compose in a flow of your own: `validate_data`,
  `describe_base`, `start_mlflow_run`, `read_champion`, `train`, `evaluate`, `log_results`,
  `register`, `decide`, `apply_decision`;
- the config: `PipelineConfig` and its sections, `load_config`, `config_from_dict`, the
  Prefect block `PipelineConfigBlock` (`prefect block register -m prefect_lora`) and
  `read_config` (a YAML path or `block:NAME`);
- the gate's pure functions: `decide_promotion(candidate, champion, policy) -> Decision`,
  `candidate_from_metrics`, `decide_on_report`.

The domain library (no Prefect) is `prefect_lora.lora_tasks`, laid out by stage: `data`,
`training`, `measurement`, `gate`, `registry`.
"""

from prefect_lora.lora_tasks import __version__
from prefect_lora.lora_tasks.exports import lazy_exports

_all, __getattr__, __dir__ = lazy_exports(__name__, {
    "flows.retrain": ["retrain", "register_run", "validate_data", "describe_base", "start_mlflow_run", "read_champion",
                      "train", "evaluate", "log_results", "register", "decide", "apply_decision"],
    "flows.fleet": ["retrain_fleet", "watch_fleet"],
    "flows.promote": ["promote"],
    "flows.rollback": ["rollback"],
    "flows.blocks": ["PipelineConfigBlock", "read_config"],
    "lora_tasks.config": ["PipelineConfig", "PromotionPolicy", "load_config", "config_from_dict"],
    "lora_tasks.data.prepare": ["PreparedData", "run_dir_for", "lineage_tags"],
    "lora_tasks.measurement.evaluation": ["EvalReport"],
    "lora_tasks.gate.promotion": ["Candidate", "Decision", "candidate_from_metrics", "decide_promotion"],
    "lora_tasks.gate.decide": ["decide_on_report"],
    "lora_tasks.registry.lifecycle": ["RunResult"],
})
__all__ = ["__version__", *_all]  # noqa: PLE0604  (names, listed by lazy_exports)
