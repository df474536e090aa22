"""A batch that mixes adapters of one base: in one pass PEFT routes each row through its own
adapter, and each row answers as its adapter does alone. The replica's inference code on a real
tiny PEFT model, with no Ray and no HTTP."""

import threading
from collections import OrderedDict

import pytest
import torch


@pytest.fixture(scope="module")
def replica(tmp_path_factory, tiny_model_dir):
    from peft import PeftModel

    from deploy.serve import AdapterModel
    from deploy.serve_core import ServeConfig
    from deploy.testing import make_random_adapter
    from lora_tasks.modeling import load_base_model, load_tokenizer

    work = tmp_path_factory.mktemp("mixed")
    dirs = [make_random_adapter(tiny_model_dir, work / f"a{i}", 40 + i) for i in range(3)]
    r = object.__new__(AdapterModel.func_or_class)  # the deployment's class, built by hand: no Serve replica
    r.cfg, r.device, r.task, r._lock = ServeConfig(model_name="m"), torch.device("cpu"), "causal_lm", threading.Lock()
    r.tokenizer = load_tokenizer(tiny_model_dir)
    r.peft = PeftModel.from_pretrained(load_base_model(tiny_model_dir, "causal_lm"), str(dirs[0]), adapter_name="a0",
                                       is_trainable=False)
    for i in (1, 2):
        r.peft.load_adapter(str(dirs[i]), adapter_name=f"a{i}", is_trainable=False)
    r.peft.eval()
    r.loaded, r._layers, r._active = OrderedDict((f"a{i}", 0) for i in range(3)), None, None
    return r


PROMPTS = ["What is 12 plus 30? Answer:", "Add 40 and 2.", "Sum of 7 and 8 is"]


def test_each_row_of_a_mixed_batch_answers_as_its_adapter_alone(replica):
    alone = {}
    for name in ("a0", "a1", "a2"):
        replica._switch(name)
        out = replica._generate(replica.peft, PROMPTS, True, [8] * 3, 0.0)
        alone[name] = out["texts"]
    assert len({tuple(t) for t in alone.values()}) == 3, "the three adapters answer differently"
    names = ["a2", "a0", "a1", "a0"]
    texts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    out = replica._generate(replica.peft, texts, True, [8, 8, 4, 8], 0.0, names)
    expected = [alone["a2"][0], alone["a0"][1], alone["a1"][2], alone["a0"][0]]
    assert out["texts"][:2] + out["texts"][3:] == expected[:2] + expected[3:]
    assert expected[2].startswith(out["texts"][2]) and out["completion_tokens"][2] <= 4, "its own max_tokens"
    assert len(out["prompt_tokens"]) == 4 and out["finish"][2] in {"stop", "length"}
