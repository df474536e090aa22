"""The pipeline config as a Prefect block: saved by name, edited in the Prefect UI, run by name.

`PipelineConfigBlock` holds a whole `PipelineConfig` in one field, `config`, whose JSON schema
is the config's own: the UI's form shows each section as a group and each setting with its
docstring as help, and a section added to the config appears in the form with no change here.
The one secret, `notifications.webhook_url`, is a `SecretStr` in the block: Prefect keeps it
encrypted, shows it obfuscated, keeps it when the form is saved unchanged, and gives it back whole
when the block is loaded. A config read from a block is validated as a YAML config is
(`config_from_dict`: every problem at once, under its key path), so one edited in the UI into a
broken config is refused with the same messages, and a saved config comes back equal, with the
same config hash (its paths are those resolved when it was saved: absolute).

Register the type, so that the UI's catalogue offers it: `prefect block register -m prefect_lora`
(saving a block registers it too).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from prefect.blocks.core import Block
from prefect_lora.lora_tasks.config import NotificationsConfig, PipelineConfig, Problem, config_from_dict, load_config
from prefect_lora.lora_tasks.errors import ConfigError
from prefect_lora.lora_tasks.secrets import SECRET_KEYS
from pydantic import ConfigDict, Field, SecretStr

BLOCK_PREFIX = "block:"
"""`block:NAME` names a saved `PipelineConfigBlock` wherever a config path is taken."""

_BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
"""What Prefect takes as a block's name: lowercase letters, digits and dashes."""


class StoredNotifications(NotificationsConfig):
    """Where a run's failure or promotion is posted; the webhook URL is kept as a secret (shown obfuscated)."""

    model_config = ConfigDict(title="Notifications")

    webhook_url: SecretStr | None = Field(None, description=NotificationsConfig.model_fields["webhook_url"].description)

    def _check_url(self) -> Iterator[Problem]:
        return iter(())  # checked on the plain URL when the config is read back (`pipeline_config`)


class StoredPipelineConfig(PipelineConfig):
    """The pipeline config, section by section, as a YAML config file holds it."""

    model_config = ConfigDict(title="Pipeline Config")

    notifications: StoredNotifications = Field(default_factory=StoredNotifications)


class PipelineConfigBlock(Block):
    """A prefect-lora pipeline config (model, data, LoRA, training, scaling, evaluation, gate,
    tracking, notifications, remedies), kept by name. The webhook URL is kept as a secret."""

    _block_type_name: ClassVar[str] = "LoRA Pipeline Config"
    _block_type_slug: ClassVar[str] = "lora-pipeline-config"
    _code_example: ClassVar[str] = """
        from prefect_lora.flows.blocks import PipelineConfigBlock
        from prefect_lora.flows.retrain import retrain

        cfg = PipelineConfigBlock.load("BLOCK_NAME").pipeline_config()  # a validated PipelineConfig
        retrain("block:BLOCK_NAME")  # or, in a shell: prefect-lora run block:BLOCK_NAME
        """

    config: StoredPipelineConfig
    """The whole pipeline config, as a YAML config file holds it (`prefect-lora block save CONFIG --name NAME`)."""

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> PipelineConfigBlock:
        """A block holding `cfg`; `.save(name)` keeps it."""
        return cls(config=StoredPipelineConfig.model_validate(cfg.model_dump()))

    def pipeline_config(self, overrides: list[str] | None = None) -> PipelineConfig:
        """The config this block holds, its secret restored and `key.path=value` overrides applied,
        validated as a YAML config is (one ConfigError naming every problem)."""
        raw = self.config.model_dump(mode="json")
        for section, key in SECRET_KEYS:
            secret = getattr(getattr(self.config, section), key)
            raw[section][key] = secret.get_secret_value() if secret is not None else None
        return config_from_dict(raw, source=f"block {self._block_document_name or '(unsaved)'}", overrides=overrides)


def save_config_block(config_path: str | Path, name: str, overrides: list[str] | None = None,
                      overwrite: bool = False) -> PipelineConfigBlock:
    """Load the YAML config at `config_path` (with overrides) and save it as the block `name`."""
    if not _BLOCK_NAME.match(name):
        raise ConfigError([f"{name!r} is no block name: use lowercase letters, digits and dashes"], "--name")
    block = PipelineConfigBlock.from_config(load_config(config_path, overrides))
    if not overwrite and _read_block_data(name) is not None:
        raise ConfigError([f"a config block named {name!r} exists: save with overwrite (--overwrite) to replace it"], "--name")
    block.save(name, overwrite=overwrite)
    return block


def read_config(source: str, overrides: list[str] | None = None) -> PipelineConfig:
    """The config at `source`: a YAML file's path, or the name of a saved `PipelineConfigBlock`
    (`block:NAME`, or NAME when no file has that path); `key.path=value` overrides apply to either."""
    name = block_name(source)
    if name is None:
        return load_config(source, overrides)
    data = _read_block_data(name)
    if data is None:
        raise _neither(source, name, is_name=True)
    return config_from_dict(data.get("config"), source=f"block {name}", overrides=overrides)


def block_name(source: str) -> str | None:
    """The block `source` names, or None when it is a config file's path; a ConfigError when it
    can be neither (no such file, and no block could have that name). Reads no block."""
    if not source.startswith(BLOCK_PREFIX) and os.path.isfile(os.path.expanduser(source)):
        return None
    name = source.removeprefix(BLOCK_PREFIX)
    if not _BLOCK_NAME.match(name):
        raise _neither(source, name, is_name=False)
    return name


def _neither(source: str, name: str, is_name: bool) -> ConfigError:
    """The error for a config source that is no file and no saved block."""
    if source.startswith(BLOCK_PREFIX):
        what = (f"no saved config block named {name!r}" if is_name else
                f"{name!r} is no block name (lowercase letters, digits and dashes)")
    else:
        what = f"no config file {source!r}" + (f" and no saved config block named {name!r}" if is_name else "")
    hint = ("give the path to a YAML config (e.g. configs/tiny.yaml), or the name of a config saved as a Prefect "
            "block (`prefect-lora block save CONFIG --name NAME`, then NAME or block:NAME)")
    return ConfigError([f"{what}: {hint}"], source)


def _read_block_data(name: str) -> dict | None:
    """The saved block's data, its secret included, or None when no config block has that name.
    Read as stored, not validated into the block, so that a config edited into a broken one is
    reported as a YAML config would be."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            doc = client.read_block_document_by_name(name=name, block_type_slug=PipelineConfigBlock.get_block_type_slug(),
                                                     include_secrets=True)
        except ObjectNotFound:
            return None
    return doc.data
