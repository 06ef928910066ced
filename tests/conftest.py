"""Shared test set-up: offline Hugging Face libraries and tiny worlds, models and exported folders.

The environment is set at import time, before any test module imports ``transformers`` or ``datasets``, so the
libraries read it when they load: no test touches the network or the user's Hugging Face cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="repo_lightning-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

from repo_lightning.safetyworld import World, WorldConfig  # noqa: E402

#: Sizes of the tiny SafetyWorld used across tests (WorldConfig field names).
TINY_WORLD = {
    "num_topics": 6,
    "num_sft_rows": 64,
    "num_preference_rows": 64,
    "num_rl_prompts": 32,
    "num_eval_prompts": 16,
}

#: A tiny Llama (a few thousand parameters); vocabulary and special ids come from the tokenizer.
TINY_MODEL = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def oracle_score_fns(world: World):
    """``(reward, cost)`` score functions ``(prompts, answers) -> [N]`` that are the world's oracles ``R*`` and
    ``C*``, in the place of learned models (the benchmarks' ``ScoreFn``)."""

    def reward(prompts: list[str], answers: list[str]) -> torch.Tensor:
        return torch.tensor([world.helpfulness(p, a) for p, a in zip(prompts, answers, strict=True)])

    def cost(prompts: list[str], answers: list[str]) -> torch.Tensor:
        return torch.tensor([world.harm(p, a) for p, a in zip(prompts, answers, strict=True)])

    return reward, cost


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    The models are tiny, and on a shared 2-core machine thread spin-waits cost about 10x; one thread also makes a
    run and its subprocesses sum in the same order.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_world_config() -> WorldConfig:
    """A SafetyWorld config small enough to generate in milliseconds (6 topics, 64 SFT/preference rows)."""
    return WorldConfig(**TINY_WORLD)


@pytest.fixture
def tiny_model_config() -> dict:
    """A fresh copy of the tiny Llama config dict (``model_config`` of the loaders and modules)."""
    return dict(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny untrained models saved in Hugging Face layout, shared by the whole session (treat as read-only).

    Returns:
        ``{"tokenizer": ..., "sft": ..., "reward": ..., "cost": ...}``, each a ``str`` path of a folder written by
        ``save_pretrained``:

        * ``tokenizer``: the SafetyWorld word-level tokenizer of ``WorldConfig(**TINY_WORLD)`` alone (the world of
          the ``tiny_world_config`` fixture, so the data's tokenizer has the same vocabulary and ids);
        * ``sft``: a tiny ``LlamaForCausalLM`` (``TINY_MODEL``, seed 0);
        * ``reward``, ``cost``: tiny ``LlamaForSequenceClassification`` models with ``num_labels=1`` (seeds 1, 2).

        Every model folder also holds the same tokenizer, so each loads with ``AutoTokenizer.from_pretrained``.
    """
    from repo_lightning.models.backbone import load_causal_lm, load_score_model

    root = tmp_path_factory.mktemp("tiny_exports")
    tokenizer = World(WorldConfig(**TINY_WORLD)).build_tokenizer()
    paths = {name: root / name for name in ("tokenizer", "sft", "reward", "cost")}
    tokenizer.save_pretrained(paths["tokenizer"])
    torch.manual_seed(0)
    load_causal_lm(tokenizer, model_config=dict(TINY_MODEL)).save_pretrained(paths["sft"])
    for seed, name in ((1, "reward"), (2, "cost")):
        torch.manual_seed(seed)
        load_score_model(tokenizer, model_config=dict(TINY_MODEL)).save_pretrained(paths[name])
    for name in ("sft", "reward", "cost"):
        tokenizer.save_pretrained(paths[name])
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def tiny_policy(tiny_exports):
    """A default ``PolicyModule`` on ``tiny_exports`` with its models loaded (treat as read-only)."""
    from repo_lightning.modules import PolicyModule

    module = PolicyModule(
        actor_path=tiny_exports["sft"],
        reward_model_path=tiny_exports["reward"],
        cost_model_path=tiny_exports["cost"],
        tokenizer_path=tiny_exports["tokenizer"],
    )
    module.configure_model()
    return module
