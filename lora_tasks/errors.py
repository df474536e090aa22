"""The errors prefect-lora raises on purpose: each one is a message a user can act on."""

from __future__ import annotations


class LoraTaskError(Exception):
    """Base of every error that should reach a user as one clear message, not a traceback."""


class ConfigError(LoraTaskError):
    """A config file or override is invalid; the message lists every problem with its key path."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")


class DataError(LoraTaskError):
    """A data source cannot be read as a table (missing file, bad encoding, unknown format)."""


class ValidationFailed(LoraTaskError):
    """The data broke its contract; carries the full report so the caller can log it."""

    def __init__(self, message: str, report=None):
        self.report = report
        super().__init__(message)


class TrainingError(LoraTaskError):
    """Training did not produce an adapter."""


class NonFiniteLoss(TrainingError):
    """The training loss became NaN or infinite: the settings diverge, and a retry would only
    diverge again."""


class RegistryError(LoraTaskError):
    """The MLflow registry could not be read or written as asked."""


class UnknownModel(RegistryError):
    """No registered model of that name: the message names those that exist."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"no registered model named {name!r} in this tracking store; registered models: "
                         f"{known or 'none'}. Check the name or --tracking-uri")
