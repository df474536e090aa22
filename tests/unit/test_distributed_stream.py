"""The streamed data position: pure logic of `_shard_batches` over a stand-in for a Ray Data shard."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
from prefect_lora.lora_tasks.config import config_from_dict


class FakeShard:
    """Yields an ordered stream of numbered rows, shuffled by the seed as a local shuffle would."""

    def __init__(self, n: int):
        self.n = n

    def iter_batches(self, *, batch_size, batch_format, drop_last, local_shuffle_buffer_size, local_shuffle_seed):
        import random

        order = list(range(self.n))
        random.Random(local_shuffle_seed).shuffle(order)
        for i in range(0, self.n - (self.n % batch_size if drop_last else 0), batch_size):
            yield pd.DataFrame({"i": order[i : i + batch_size]})


def cfg(batch_size: int):
    return config_from_dict({
        "model_name": "m", "task": "causal_lm", "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train_path": "x.jsonl"}, "training": {"max_steps": 10, "batch_size": batch_size},
    })


@pytest.mark.parametrize("world_size,start", [(1, 0), (1, 7), (2, 3), (2, 11), (3, 5)])
def test_resuming_at_a_count_gives_exactly_the_remaining_batches(world_size, start):
    from prefect_lora.lora_tasks.training.distributed import _shard_batches

    n, bs = 50, 4
    for rank in range(world_size):
        stream = _shard_batches(FakeShard(n), cfg(bs), rank, world_size, n)
        straight = list(itertools.islice(stream(0), 30))
        resumed = list(itertools.islice(stream(start), 30 - start))
        assert resumed == straight[start:]


def test_ranks_share_each_global_batch_without_overlap_and_epochs_reshuffle():
    from prefect_lora.lora_tasks.training.distributed import _shard_batches

    n, bs, world = 40, 4, 2
    per_epoch = n // (bs * world)
    streams = [list(itertools.islice(_shard_batches(FakeShard(n), cfg(bs), r, world, n)(0), 2 * per_epoch)) for r in range(world)]
    epoch0 = [row["i"] for s in streams for b in s[:per_epoch] for row in b]
    assert sorted(epoch0) == list(range(n))  # every row once per epoch, on one rank
    assert streams[0][:per_epoch] != streams[0][per_epoch:]  # the next epoch is another order


def test_too_few_rows_for_one_batch_is_a_clear_error():
    from prefect_lora.lora_tasks.errors import TrainingError
    from prefect_lora.lora_tasks.training.distributed import _shard_batches

    with pytest.raises(TrainingError, match="cannot fill one batch"):
        _shard_batches(FakeShard(5), cfg(4), 0, 2, 5)
