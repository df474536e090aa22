"""prefect-lora: scheduled LoRA retraining on Prefect."""

from prefect_lora.lora_tasks import __version__

__all__ = ["__version__"]
