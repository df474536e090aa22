"""prefect-lora's domain library: config, data contract, LoRA training, evaluation, promotion.

Plain Python with no orchestration: every function takes plain arguments and returns plain
results, so it runs the same under Prefect, in a notebook or in a unit test.
"""

__version__ = "0.1.0"
