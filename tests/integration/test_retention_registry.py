"""Version retention against a real MLflow store (SQLite): the selection deletes old versions,
never the champion, the previous champion or the challenger, and the registry refuses to delete a
version an alias points at. No training: versions are registered from a plain folder."""

from __future__ import annotations

import pytest
from prefect_lora.lora_tasks.errors import RegistryError
from prefect_lora.lora_tasks.registry import aliases, lifecycle, registry, tracking

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    c.create_registered_model("m")
    src = tmp_path / "model"
    src.mkdir()
    for _ in range(6):
        c.create_model_version("m", str(src))
    # version 2 was champion, then 4 (so 2 is the previous champion); 6 is the challenger
    aliases.promote_version(uri, "m", "2", reason="first")
    aliases.promote_version(uri, "m", "4", reason="better")
    c.set_registered_model_alias("m", registry.CHALLENGER, "6")
    return uri


def test_retention_keeps_champion_previous_champion_and_challenger(store):
    protected = aliases.protected_versions(store, "m")
    assert protected == {"4", "2", "6"}
    doomed = lifecycle.versions_to_delete(registry.list_versions(store, "m"), 1, protected)
    assert doomed == ["5", "3", "1"]
    assert registry.delete_versions(store, "m", doomed) == doomed
    assert registry.list_versions(store, "m") == ["2", "4", "6"]
    assert registry.get_alias(store, "m", registry.CHAMPION).version == "4"
    assert aliases.previous_champion(store, "m") == "2"


def test_registry_refuses_to_delete_an_aliased_version(store):
    with pytest.raises(RegistryError, match="refusing to delete version 4 .* an alias points at it"):
        registry.delete_versions(store, "m", ["4"])
    assert "4" in registry.list_versions(store, "m")
