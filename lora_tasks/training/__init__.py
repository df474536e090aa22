"""Training: text to tokens and batches (`encoding`), one worker's loop as named set-up steps
(`loop`), the launcher pair that runs it in this process or on Ray Train (`launcher`, and
`distributed`, the only module that touches Ray), replay of general data and the probes it is
drawn from (`replay`, `probes`), one model seen with and without its adapters (`views`)."""

from ..exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "encoding": ["encode_examples", "collate", "format_prompts", "generate_answers"],
    "loop": ["WorkerContext", "TrainResult", "train_worker"],
    "launcher": ["prepare_data", "train_adapter", "train_in_process", "launcher_for", "latest_checkpoint"],
    "replay": ["replay_rows", "check_disjoint"],
    "probes": ["probe_prompts", "base_answers"],
    "views": ["PeftViews", "SeparateViews"],
})
