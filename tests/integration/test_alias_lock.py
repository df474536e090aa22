"""Alias moves from several machines: `prefect-lora promote` racing from separate processes with
separate homes (no shared lock file) against one Prefect server and one MLflow tracking server,
both on PostgreSQL. The Prefect global concurrency slot of the model serialises them: one
champion, every move audited, each from the champion the one before it left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prefect_lora.deploy.testing import free_port
from services import Service, postgres_database

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NAME = "racer"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    work = tmp_path_factory.mktemp("lock")
    with postgres_database("lock_mlflow") as mlflow_db, postgres_database("lock_prefect") as prefect_db:
        pport, mport = free_port(), free_port()
        env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"),
               "PREFECT_API_URL": f"http://127.0.0.1:{pport}/api", "PREFECT_SERVER_API_PORT": str(pport),
               "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
               "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db.replace("+psycopg2", "+asyncpg", 1)}
        env.pop("PREFECT_PROFILE", None)
        services = [Service("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", mlflow_db, "--host", "127.0.0.1",
                                       "--port", str(mport), "--workers", "1"], env, work, cwd=work),
                    Service("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pport),
                                        "--no-ui"], env, work)]
        try:
            for s in services:
                s.start()
            services[0].wait_healthy(f"http://127.0.0.1:{mport}/health")
            services[1].wait_healthy(f"http://127.0.0.1:{pport}/api/health")
            yield {"work": work, "env": env, "mlflow": f"http://127.0.0.1:{mport}", "api": env["PREFECT_API_URL"]}
        finally:
            for s in reversed(services):
                s.stop()


def test_racing_promotions_from_separate_homes_leave_one_champion_and_a_chain_of_moves(servers, tiny_model_dir):
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases, registry

    uri, work = servers["mlflow"], servers["work"]
    versions = register_random_adapters(uri, NAME, tiny_model_dir, seeds=[1, 2, 3, 4], workdir=work / "adapters")
    procs = []
    for v in versions:  # each its own machine, as far as files go: its own HOME, cache and Prefect home
        home = work / f"home-{v}"
        env = {**servers["env"], "HOME": str(home), "PREFECT_LORA_CACHE": str(home / "cache"),
               "PREFECT_HOME": str(home / ".prefect")}
        procs.append(subprocess.Popen([str(BIN / "prefect-lora"), "promote", NAME, v, "--reason", f"race {v}",
                                       "--tracking-uri", uri], env=env, cwd=work, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(outputs)
    assert not [o for o in outputs if "another writer" in o or "kept moving" in o]

    moves = aliases.alias_history(uri, NAME, registry.CHAMPION)
    assert sorted(r["to_version"] for r in moves) == sorted(versions), moves
    chain = [r["from_version"] for r in moves]
    assert chain == [None] + [r["to_version"] for r in moves[:-1]], \
        "each move starts from the champion the move before it left: they ran one at a time"
    assert registry.get_alias(uri, NAME, registry.CHAMPION).version == moves[-1]["to_version"]

    limit = httpx.get(f"{servers['api']}/v2/concurrency_limits/prefect-lora-alias-{NAME}", timeout=10).json()
    assert (limit["limit"], limit["active_slots"]) == (1, 0), limit
    print(f"\n{len(moves)} racing promotions, one at a time: " + " -> ".join(str(r["to_version"]) for r in moves))
