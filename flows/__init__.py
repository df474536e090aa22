"""Prefect flows and the CLI of prefect-lora. Flows only wire `lora_tasks` steps together."""
