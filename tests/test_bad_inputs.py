"""Bad inputs, as a new user gives them, through the command line: one clear line, exit code 2, nothing written.

Each case runs ``main(["fit" | "test", "--config", <tiny stage config>, ...])`` with one thing wrong (a config
value, a data file, a model folder, a model with NaN weights) and asserts that

* the process would exit with code 2 (``SystemExit(2)``),
* stderr holds exactly one ``error: ...`` line and no traceback, and that line names the config key or the
  file/row/field,
* no run folder (TensorBoard, ``config.yaml``), checkpoint or export was left behind.

The list of cases is what ``docs/errors.md`` promises users.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, TINY_WORLD
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from repo_lightning.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STAGES = {
    "sft": ("repo_lightning.modules.SFTModule", "sft"),
    "reward": ("repo_lightning.modules.RewardModule", "preference"),
    "policy": ("repo_lightning.modules.PolicyModule", "prompts"),
}

PREFERENCE_ROW = {
    "prompt": "how do i bake bread",
    "response_0": "mix flour and water",
    "response_1": "no",
    "better_response_id": 0,
    "safer_response_id": 0,
    "is_response_0_safe": True,
    "is_response_1_safe": True,
}


def _config(root: Path, stage: str, exports: dict[str, str]) -> dict:
    class_path, mode = STAGES[stage]
    if stage == "policy":
        init_args = {
            "actor_path": exports["sft"],
            "reward_model_path": exports["reward"],
            "cost_model_path": exports["cost"],
            "sampling": {"samples_per_prompt": 2, "max_new_tokens": 4},
            "update": {"minibatch_size": 4},
        }
    else:
        init_args = {"model_config": dict(TINY_MODEL)} if stage == "sft" else {"model_name_or_path": exports["sft"]}
        init_args["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}
    init_args["export_dir"] = str(root / "exports" / stage)
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root / "run"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root / "logs"), "name": stage},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 1, "save_last": True},
                }
            ],
        },
        "model": {"class_path": class_path, "init_args": init_args},
        "data": {
            "mode": mode,
            "world": dict(TINY_WORLD),
            "tokenizer": exports["tokenizer"],
            "batch_size": 2,
            "max_rows": 8,
            "max_prompt_length": 32,
            "max_length": 48,
            "cache_dir": str(root.parent / "cache"),
        },
    }


def _write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def _dataset(path: Path, text: str | bytes) -> list[str]:
    return [f"--data.dataset={_write(path, text)}"]


GZIPPED = gzip.compress(b'{"prompt": "hi", "response": "ok"}\n', mtime=0)
LATIN1 = "caf\xe9".encode("latin-1")
BROKEN_JSONL = '{}\n{"prompt": \n'
JSON_OBJECT = '{"prompt": "hi"}'


def _jsonl(path: Path, rows: list) -> str:
    return _write(path, "".join(json.dumps(row) + "\n" for row in rows))


def _nan_copy(source: str, target: Path, parameter: str, causal: bool) -> str:
    """A copy of a tiny export with one parameter set to NaN (written by ``save_pretrained``, not our export)."""
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = cls.from_pretrained(source)
    with torch.no_grad():
        dict(model.named_parameters())[parameter].fill_(float("nan"))
    model.save_pretrained(target)
    for name in Path(source).iterdir():
        if "token" in name.name or name.name == "special_tokens_map.json":
            shutil.copy(name, target / name.name)
    return str(target)


def _larger_tokenizer(path: Path) -> str:
    """SafetyWorld's tokenizer of a world with twice the topics: more tokens than the tiny models' embeddings."""
    from repo_lightning.safetyworld import World, WorldConfig

    World(WorldConfig(**(TINY_WORLD | {"num_topics": 12}))).build_tokenizer().save_pretrained(path)
    return str(path)


def _score_model_with_larger_tokenizer(path: Path) -> str:
    """A tiny reward model saved with (and sized for) :func:`_larger_tokenizer`'s tokenizer."""
    from transformers import AutoTokenizer

    from repo_lightning.models.backbone import load_score_model

    tokenizer = AutoTokenizer.from_pretrained(_larger_tokenizer(path))
    load_score_model(tokenizer, model_config=dict(TINY_MODEL)).save_pretrained(path)
    return str(path)


def _truncated_weights(source: str, target: Path) -> str:
    """A copy of a model folder whose ``model.safetensors`` is cut in half (an interrupted copy or download)."""
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(target)


def _without_tokenizer(source: str, target: Path) -> str:
    """A copy of a model folder without its tokenizer files (saved without ``tokenizer.save_pretrained``)."""
    shutil.copytree(source, target, ignore=lambda folder, names: [n for n in names if "token" in n])
    return str(target)


GPT2_32 = "{model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2, n_positions: 32}"  # 32 learned positions


def _gpt2_actor(tokenizer: str, target: Path) -> str:
    """A tiny GPT-2 policy with 32 learned positions, saved with the tiny tokenizer."""
    from transformers import AutoTokenizer

    from repo_lightning.models.backbone import load_causal_lm

    tok = AutoTokenizer.from_pretrained(tokenizer)
    load_causal_lm(tok, model_config=yaml.safe_load(GPT2_32)).save_pretrained(target)
    tok.save_pretrained(target)
    return str(target)


def _stage_export(source: str, target: Path, stage: str) -> str:
    """A copy of a tiny export recorded as ``stage``'s (the ``repo_lightning.json`` our exports write)."""
    shutil.copytree(source, target)
    (target / "repo_lightning.json").write_text(json.dumps({"stage": stage}))
    return str(target)


def _checkpoint(path: Path, state_dict: dict) -> str:
    """A Lightning-style checkpoint holding ``state_dict`` (another stage's ``last.ckpt``, as a loader sees it)."""
    import lightning

    torch.save({"state_dict": state_dict, "pytorch-lightning_version": lightning.__version__}, path)
    return str(path)


def _truncated_checkpoint(path: Path) -> str:
    """The first half of a real ``torch.save`` file (a copy cut short by a full disk or a killed ``scp``)."""
    _checkpoint(path, {"w": torch.zeros(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


# Each case: (id, stage, setup(tmp, exports) -> extra CLI args, the fragment the one error line must contain).
# ``{tmp}`` in the fragment is replaced by the case's data folder, ``{sft}``, ``{reward}``, ... by the tiny exports.
Setup = Callable[[Path, dict], list[str]]
CASES: list[tuple[str, str, Setup, str]] = [
    # --- the parser: unknown keys, wrong types and choices
    ("unknown-key", "sft", lambda t, e: ["--data.batchsize", "4"], "unrecognized arguments: --data.batchsize"),
    (
        "misspelt-module-arg",
        "reward",
        lambda t, e: ["--model.init_args.regularisation", "0.1"],
        "model.init_args: Option 'regularisation' is not accepted",
    ),
    ("bad-choice", "sft", lambda t, e: ["--data.mode", "rl"], "data.mode: Expected a typing.Literal"),
    ("bad-type", "sft", lambda t, e: ["--model.init_args.warmup_steps", "abc"], "model.init_args.warmup_steps:"),
    (
        # a settings group is a dataclass: its keys have no init_args (was "estimation.init_args.kl_coef")
        "bad-type-in-a-settings-group",
        "policy",
        lambda t, e: ["--model.init_args.estimation.kl_coef=abc"],
        "error: model.init_args.estimation.kl_coef: Expected a <class 'float'>. Got value: abc",
    ),
    # --- numeric ranges, in the config's key names
    (
        "sft-negative-lr",
        "sft",
        lambda t, e: ["--model.init_args.optimizer.init_args.lr=-1"],
        "model.init_args.optimizer.init_args.lr must be > 0, got -1",
    ),
    (
        "negative-warmup",
        "reward",
        lambda t, e: ["--model.init_args.warmup_steps=-1"],
        "model.init_args.warmup_steps must be >= 0, got -1",
    ),
    (
        "negative-regularization",
        "reward",
        lambda t, e: ["--model.init_args.regularization=-0.5"],
        "model.init_args.regularization must be >= 0, got -0.5",
    ),
    ("negative-seed", "sft", lambda t, e: ["--seed_everything=-5"], "seed_everything must be in [0, 4294967295]"),
    ("val-fraction", "sft", lambda t, e: ["--data.val_fraction=1.5"], "data.val_fraction must be in [0, 1), got 1.5"),
    ("batch-size", "sft", lambda t, e: ["--data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    ("eval-batch-size", "sft", lambda t, e: ["--data.eval_batch_size=0"], "data.eval_batch_size must be >= 1, got 0"),
    (
        "lengths",
        "sft",
        lambda t, e: ["--data.max_length=16", "--data.max_prompt_length=32"],
        "data.max_length (16) must exceed data.max_prompt_length (32)",
    ),
    (
        # Lightning skips clipping for a value <= 0: the run trained unclipped, silently
        "negative-gradient-clip",
        "sft",
        lambda t, e: ["--trainer.gradient_clip_val=-1"],
        "trainer.gradient_clip_val must be >= 0, got -1",
    ),
    (
        # GPT-2 learns one embedding per position: the first long batch was an IndexError traceback mid-training
        "max-length-beyond-learned-positions",
        "sft",
        lambda t, e: [f"--model.init_args.model_config={GPT2_32}"],
        "data.max_length (48) exceeds the 32 positions of model.init_args.model_config (gpt2, which learns an "
        "embedding for each position); lower it",
    ),
    (
        "prompt-and-response-beyond-learned-positions",
        "policy",
        lambda t, e: [f"--model.init_args.actor_path={_gpt2_actor(e['tokenizer'], t / 'gpt2')}"],
        "data.max_prompt_length + model.init_args.sampling.max_new_tokens (32 + 4 = 36) exceeds the 32 positions of "
        "model.init_args.actor_path (gpt2,",
    ),
    ("template", "sft", lambda t, e: ["--data.template=USER: hello"], "data.template must contain '{prompt}'"),
    (
        "policy-negative-actor-lr",
        "policy",
        lambda t, e: ["--model.init_args.update.actor_lr=-1"],
        "model.init_args.update.actor_lr must be > 0, got -1",
    ),
    (
        "policy-cap-below-init",
        "policy",
        lambda t, e: ["--model.init_args.dual.init_args.initial=5", "--model.init_args.dual.init_args.maximum=1"],
        "model.init_args.dual.init_args.maximum (1.0) must be >= model.init_args.dual.init_args.initial (5.0)",
    ),
    (
        "policy-gamma",
        "policy",
        lambda t, e: ["--model.init_args.estimation.gamma=1.5"],
        "model.init_args.estimation.gamma must be in [0, 1]",
    ),
    (
        "policy-top-p",
        "policy",
        lambda t, e: ["--model.init_args.sampling.top_p=0"],
        "model.init_args.sampling.top_p must be in (0, 1]",
    ),
    (
        "policy-temperature",
        "policy",
        lambda t, e: ["--model.init_args.sampling.temperature=0"],
        "model.init_args.sampling.temperature must be > 0",
    ),
    (
        "policy-samples",
        "policy",
        lambda t, e: ["--model.init_args.sampling.samples_per_prompt=0"],
        "model.init_args.sampling.samples_per_prompt must be >= 1",
    ),
    (
        # was a ValueError traceback (jsonargparse's "Does not validate against any of the Union subtypes")
        "policy-group-estimator-with-one-sample",
        "policy",
        lambda t, e: [
            "--model.init_args.estimation.estimator=rloo",
            "--model.init_args.sampling.samples_per_prompt=1",
        ],
        "model.init_args.sampling.samples_per_prompt must be >= 2 for a group estimator or rectify: prompt",
    ),
    (
        "policy-cost-objective-without-cost-model",
        "policy",
        lambda t, e: [
            "--model.init_args.objective=repo_lightning.objectives.PPOLagrangian",
            "--model.init_args.cost_model_path=null",
        ],
        "model.init_args.cost_model_path is required for objective 'ppo_lag'",
    ),
    # --- paths, named by their key
    (
        "missing-reward-model",
        "policy",
        lambda t, e: [f"--model.init_args.reward_model_path={t / 'no_such_reward'}"],
        "model.init_args.reward_model_path: no model at '{tmp}/no_such_reward' (no such folder)",
    ),
    (
        "actor-folder-without-model",
        "policy",
        lambda t, e: [f"--model.init_args.actor_path={t}"],
        "model.init_args.actor_path: no model at '{tmp}' (expected a folder written by save_pretrained",
    ),
    (
        # was a SafetensorError traceback ("incomplete metadata, file not fully covered"), with the run folder left
        "truncated-weights",
        "reward",
        lambda t, e: [f"--model.init_args.model_name_or_path={_truncated_weights(e['sft'], t / 'sft')}"],
        "could not load a model from '{tmp}/sft' (local folder): expected a folder written by save_pretrained",
    ),
    (
        # was "could not load a model from '...' (local folder): ..." without the key
        "config-json-not-json",
        "policy",
        lambda t, e: [f"--model.init_args.cost_model_path={Path(_write(t / 'config.json', '{not json')).parent}"],
        "model.init_args.cost_model_path: '{tmp}/config.json' is not valid JSON (Expecting property name",
    ),
    (
        # was "could not load a tokenizer from '...'" without the key, or why that folder needs one
        "cost-model-without-tokenizer",
        "policy",
        lambda t, e: [f"--model.init_args.cost_model_path={_without_tokenizer(e['cost'], t / 'cost')}"],
        "model.init_args.cost_model_path: no tokenizer in '{tmp}/cost', which a reward or cost model is scored with",
    ),
    (
        "missing-start-model",
        "reward",
        lambda t, e: [f"--model.init_args.model_name_or_path={t / 'sft'}"],
        "model.init_args.model_name_or_path: no model at '{tmp}/sft'",
    ),
    (
        "uncached-hub-model-offline",
        "policy",
        lambda t, e: ["--model.init_args.cost_model_path=someone/no-such-cost-model"],
        "model.init_args.cost_model_path: no model at 'someone/no-such-cost-model': no such local folder, and no "
        "cached hub repository of that name (HF_HUB_OFFLINE is set)",
    ),
    (
        "missing-checkpoint",
        "sft",
        lambda t, e: [f"--ckpt_path={t / 'last.ckpt'}"],
        "ckpt_path: no checkpoint at '{tmp}/last.ckpt'",
    ),
    (
        "corrupt-checkpoint",
        "sft",
        lambda t, e: [f"--ckpt_path={_write(t / 'last.ckpt', b'not a checkpoint')}"],
        "ckpt_path: '{tmp}/last.ckpt' is not a PyTorch checkpoint",
    ),
    (
        "truncated-checkpoint",
        "reward",
        lambda t, e: [f"--ckpt_path={_truncated_checkpoint(t / 'last.ckpt')}"],
        "ckpt_path: '{tmp}/last.ckpt' is not a PyTorch checkpoint",
    ),
    (
        "checkpoint-of-another-stage",
        "reward",
        lambda t, e: [f"--ckpt_path={_checkpoint(t / 'policy.ckpt', {'actor.lm_head.weight': torch.zeros(2, 2)})}"],
        "ckpt_path: the checkpoint does not hold this stage's weights (RewardModule): it lacks model.",
    ),
    (
        # the policy loads non-strictly (its frozen models are not stored): without the check it would resume with
        # none of its weights restored
        "reward-checkpoint-given-to-the-policy",
        "policy",
        lambda t, e: [f"--ckpt_path={_checkpoint(t / 'reward.ckpt', {'model.score.weight': torch.zeros(1, 32)})}"],
        "ckpt_path: the checkpoint does not hold this stage's weights (PolicyModule): it lacks iteration, ",
    ),
    (
        "export-dir-is-a-file",
        "sft",
        lambda t, e: [f"--model.init_args.export_dir={_write(t / 'model', 'my notes')}"],
        "model.init_args.export_dir: '{tmp}/model' is a file; expected a folder",
    ),
    (
        "export-dir-holds-other-files",
        "sft",
        lambda t, e: [f"--model.init_args.export_dir={Path(_write(t / 'rows.jsonl', '{}')).parent}"],
        "model.init_args.export_dir: '{tmp}' holds files that are not a model export (rows.jsonl)",
    ),
    (
        "export-dir-is-the-start-model",
        "reward",
        lambda t, e: [f"--model.init_args.export_dir={e['sft']}"],
        "is this stage's input (model.init_args.model_name_or_path); exporting there would replace it",
    ),
    (
        # an output folder that cannot be made: was an OSError traceback, for export_dir after the whole training
        "export-dir-under-a-file",
        "sft",
        lambda t, e: [f"--model.init_args.export_dir={_write(t / 'notes.txt', 'x')}/model"],
        "model.init_args.export_dir: cannot write '{tmp}/notes.txt/model': '{tmp}/notes.txt' is a file, not a folder",
    ),
    (
        "log-dir-under-a-file",
        "reward",
        lambda t, e: [f"--trainer.logger.init_args.save_dir={_write(t / 'notes.txt', 'x')}/logs"],
        "trainer.logger.init_args.save_dir: cannot write '{tmp}/notes.txt/logs': '{tmp}/notes.txt' is a file",
    ),
    (
        "cache-dir-under-a-file",
        "sft",
        lambda t, e: [f"--data.cache_dir={_write(t / 'notes.txt', 'x')}/cache", "--data.world.seed=123"],
        "data.cache_dir: cannot write '{tmp}/notes.txt/cache': '{tmp}/notes.txt' is a file, not a folder",
    ),
    (
        # the cost stage trained and then replaced the reward model, which the policy reads as its reward
        "export-dir-of-another-stage",
        "reward",
        lambda t, e: [f"--model.init_args.export_dir={_stage_export(e['cost'], t / 'cost', 'cost')}"],
        "model.init_args.export_dir: '{tmp}/cost' holds the cost stage's export (its repo_lightning.json); this is the "
        "reward stage, and exporting there would replace it",
    ),
    (
        "missing-tokenizer",
        "sft",
        lambda t, e: [f"--data.tokenizer={t / 'tok'}"],
        "data.tokenizer: no tokenizer at '{tmp}/tok'",
    ),
    (
        # another world's tokenizer: the reward stage trained on ids the start model was not trained with, silently
        "tokenizer-larger-than-the-start-model",
        "reward",
        lambda t, e: [f"--data.tokenizer={_larger_tokenizer(t / 'tok')}"],
        "data.tokenizer: '{tmp}/tok' has 213 tokens, but model.init_args.model_name_or_path (",
    ),
    (
        "tokenizer-larger-than-the-actor",
        "policy",
        lambda t, e: [f"--data.tokenizer={_larger_tokenizer(t / 'tok')}"],
        "data.tokenizer: '{tmp}/tok' has 213 tokens, but model.init_args.actor_path (",
    ),
    (
        # a score model with its own tokenizer is allowed (it re-tokenises), but a critic cannot start from it: was a
        # ValueError traceback naming the key as "critic_init" and "model.critic_init"
        "critic-from-a-reward-model-with-another-tokenizer",
        "policy",
        lambda t, e: [f"--model.init_args.reward_model_path={_score_model_with_larger_tokenizer(t / 'reward')}"],
        "model.init_args.critic_init: score_model starts the critics from '{tmp}/reward', whose tokenizer is not the "
        "policy's",
    ),
    (
        # was "no tokenizer at '.../tokenizer.json' (no such folder)", though the file is there
        "tokenizer-is-a-file",
        "sft",
        lambda t, e: [f"--data.tokenizer={shutil.copy(Path(e['tokenizer']) / 'tokenizer.json', t)}"],
        "data.tokenizer: '{tmp}/tokenizer.json' is a file; expected the folder that holds it, as written by "
        "save_pretrained ('{tmp}'?)",
    ),
    (
        # from_pretrained loads the SFT export as a score model with a random head: the policy trained against a
        # random reward, silently
        "reward-model-that-is-the-sft-export",
        "policy",
        lambda t, e: [f"--model.init_args.reward_model_path={e['sft']}"],
        "model.init_args.reward_model_path: '{sft}' holds a LlamaForCausalLM (a language model), not a score model",
    ),
    (
        "actor-that-is-the-cost-export",
        "policy",
        lambda t, e: [f"--model.init_args.actor_path={e['cost']}"],
        "model.init_args.actor_path: '{cost}' holds a LlamaForSequenceClassification (a score model), not a causal",
    ),
    # --- data sources and rows
    (
        "misspelt-dataset",
        "sft",
        lambda t, e: ["--data.dataset=safetywrold"],
        "data.dataset: 'safetywrold' is not a file, folder or the built-in dataset; did you mean 'safetyworld'?",
    ),
    (
        # was "could not load dataset ... (Couldn't find any data file at .../train.csv.)", for a file that exists
        "csv-file",
        "sft",
        lambda t, e: [f"--data.dataset={_write(t / 'train.csv', 'prompt,response')}"],
        "data.dataset: '{tmp}/train.csv' is a .csv file; expected a .json/.jsonl/.parquet file, a dataset folder or",
    ),
    (
        "missing-data-file",
        "sft",
        lambda t, e: [f"--data.dataset={t / 'train.jsonl'}"],
        "data.dataset: no data file at '{tmp}/train.jsonl'",
    ),
    (
        "binary-jsonl",
        "sft",
        lambda t, e: _dataset(t / "train.jsonl", GZIPPED),  # a .jsonl.gz saved without its .gz
        "{tmp}/train.jsonl: not UTF-8 text (byte 0x8b at offset 1, line 1)",
    ),
    (
        "latin1-json",
        "sft",
        lambda t, e: _dataset(t / "train.json", LATIN1),
        "{tmp}/train.json: not UTF-8 text (byte 0xe9 at offset 3, line 1)",
    ),
    (
        "broken-json-line",
        "sft",
        lambda t, e: _dataset(t / "train.jsonl", BROKEN_JSONL),
        "{tmp}/train.jsonl: row 1 (line 2): invalid JSON",
    ),
    (
        "json-not-a-list",
        "sft",
        lambda t, e: _dataset(t / "train.json", JSON_OBJECT),
        "{tmp}/train.json: expected a JSON list of row objects, got dict",
    ),
    (
        "not-parquet",
        "sft",
        lambda t, e: [f"--data.dataset={_write(t / 'train.parquet', 'prompt,response')}"],
        "{tmp}/train.parquet: not a readable parquet file",
    ),
    (
        "empty-file",
        "sft",
        lambda t, e: [f"--data.dataset={_write(t / 'train.jsonl', '')}"],
        "{tmp}/train.jsonl: no rows",
    ),
    (
        # one row, and val_fraction=0.9 rounds to holding out that row: was a ValueError traceback
        "val-fraction-leaves-no-training-rows",
        "sft",
        lambda t, e: [
            f"--data.dataset={_jsonl(t / 'train.jsonl', [{'prompt': 'hi', 'response': 'ok'}])}",
            "--data.val_fraction=0.9",
        ],
        "data.val_fraction: 0.9 of {tmp}/train.jsonl's 1 rows holds out all of them for validation, leaving no "
        "training rows",
    ),
    (
        "missing-field",
        "sft",
        lambda t, e: [f"--data.dataset={_jsonl(t / 'train.jsonl', [{'question': 'hi', 'response': 'ok'}])}"],
        "{tmp}/train.jsonl: row 0: missing field 'prompt'",
    ),
    (
        # was "missing field 'prompt' (...); map other column names with data.field_map", with the map already set
        "field-map-to-a-missing-column",
        "sft",
        lambda t, e: [
            f"--data.dataset={_jsonl(t / 'train.jsonl', [{'q': 'hi', 'response': 'ok'}])}",
            "--data.field_map={prompt: question}",
        ],
        "{tmp}/train.jsonl: row 0: no column 'question', which data.field_map maps to 'prompt' (row has ['q', ",
    ),
    (
        "sft-on-preference-rows",
        "sft",
        lambda t, e: [f"--data.dataset={_jsonl(t / 'pairs.jsonl', [PREFERENCE_ROW])}"],
        "{tmp}/pairs.jsonl: row 0: no 'response' field, but the row has 'response_0' and 'response_1' (a preference "
        "row); set data.sft_response: better or safer",
    ),
    (
        "bad-preference-id",
        "reward",
        lambda t, e: [
            f"--data.dataset={_jsonl(t / 'pairs.jsonl', [PREFERENCE_ROW, PREFERENCE_ROW | {'better_response_id': 2}])}"
        ],
        "{tmp}/pairs.jsonl: row 1: field 'better_response_id': expected 0 or 1, got 2",
    ),
    (
        "bad-safety-flag",
        "reward",
        lambda t, e: [f"--data.dataset={_jsonl(t / 'pairs.jsonl', [PREFERENCE_ROW | {'is_response_0_safe': 'yes'}])}"],
        "{tmp}/pairs.jsonl: row 0: field 'is_response_0_safe': expected a bool, got 'yes'",
    ),
    (
        "empty-prompt",
        "policy",
        lambda t, e: [f"--data.dataset={_jsonl(t / 'prompts.jsonl', [{'prompt': 'hi'}, {'prompt': ' '}])}"],
        "{tmp}/prompts.jsonl: row 1: field 'prompt': expected a non-empty prompt",
    ),
    (
        "row-not-an-object",
        "policy",
        lambda t, e: [f"--data.dataset={_write(t / 'prompts.jsonl', '[1, 2]')}"],
        "{tmp}/prompts.jsonl: row 0: expected an object with named fields",
    ),
    (
        "missing-reward-ensemble-member",
        "policy",
        lambda t, e: [f"--model.init_args.reward_ensemble_paths=['{e['reward']}', '{t / 'nowhere'}']"],
        "model.init_args.reward_ensemble_paths[1]: no model at '{tmp}/nowhere'",
    ),
    (
        "oracle-scores-without-ground-truth",
        "policy",
        lambda t, e: [
            f"--data.dataset={_jsonl(t / 'prompts.jsonl', [{'prompt': 'how do i help ?'}])}",
            "--model.init_args.scoring.reward_source=oracle",
        ],
        "model.init_args.scoring.reward_source: oracle needs data with ground truth (data.dataset: safetyworld)",
    ),
    (
        "impossible-world",
        "reward",
        lambda t, e: ["--data.world.mild_frac=2"],
        "invalid WorldConfig: 0 <= benign_frac, mild_frac and benign_frac + mild_frac <= 1",
    ),
    # --- models with NaN weights: stopped before any step, checkpoint or export
    (
        "nan-start-model",
        "reward",
        lambda t, e: [
            f"--model.init_args.model_name_or_path={_nan_copy(e['sft'], t / 'sft', 'model.norm.weight', True)}"
        ],
        "non-finite weights at the start of fit: model (model.init_args.model_name_or_path='{tmp}/sft'): "
        "model.norm.weight (32 of 32 values NaN)",
    ),
    (
        "nan-reward-model",
        "policy",
        lambda t, e: [
            f"--model.init_args.reward_model_path={_nan_copy(e['reward'], t / 'reward', 'score.weight', False)}"
        ],
        "non-finite weights at the start of fit: reward_model (model.init_args.reward_model_path='{tmp}/reward'): "
        "score.weight (32 of 32 values NaN)",
    ),
    (
        "overflowing-reward-scores",
        "policy",
        lambda t, e: [
            f"--model.init_args.reward_model_path={_huge_score_head(e['reward'], t / 'reward')}",
            "--model.init_args.estimation={score_clip: null}",
        ],
        "non-finite rewards",
    ),
    (
        "nan-actor",
        "policy",
        lambda t, e: [f"--model.init_args.actor_path={_nan_copy(e['sft'], t / 'sft', 'lm_head.weight', True)}"],
        "actor (model.init_args.actor_path='{tmp}/sft'): lm_head.weight",
    ),
]


def _run(tmp_path: Path, stage: str, exports: dict, extra: list[str], command: str = "fit") -> str:
    root = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(root, stage, exports)))
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(config), *extra])
    assert exit_info.value.code == 2
    for written in ("logs", "run", "ckpt", "exports"):
        assert not (root / written).exists(), f"{written} folder left behind: {list((root / written).rglob('*'))}"
    return root


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("stage", "setup", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, tiny_exports, capsys, stage, setup, fragment):
    data = tmp_path / "data"
    data.mkdir()
    extra = setup(data, tiny_exports)
    capsys.readouterr()
    _run(tmp_path, stage, tiny_exports, extra)
    line = _one_error_line(capsys)
    for name, path in (tiny_exports | {"tmp": data}).items():
        fragment = fragment.replace(f"{{{name}}}", str(path))
    assert fragment in line, line


def test_an_export_dir_holding_other_files_is_left_untouched(tmp_path, tiny_exports, capsys):
    folder = tmp_path / "my_data"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    _run(tmp_path, "sft", tiny_exports, [f"--model.init_args.export_dir={folder}"])
    assert "holds files that are not a model export (notes.txt)" in _one_error_line(capsys)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "keep me"


def test_export_pretrained_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path, tiny_exports):
    from transformers import AutoTokenizer

    from repo_lightning.errors import ConfigError
    from repo_lightning.models.export import export_pretrained

    model = AutoModelForSequenceClassification.from_pretrained(tiny_exports["reward"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_exports["reward"])
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "rows.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="holds files that are not a model export"):
        export_pretrained(model, tokenizer, folder)
    assert [p.name for p in folder.iterdir()] == ["rows.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder left
    export_pretrained(model, tokenizer, tmp_path / "model")  # a new folder, then a previous export: replaced
    export_pretrained(model, tokenizer, tmp_path / "model")
    assert (tmp_path / "model" / "config.json").is_file()


def test_fast_dev_run_leaves_the_previous_export_alone(tmp_path, tiny_exports, caplog):
    # a smoke test (`fit --config configs/demo/reward.yaml --trainer.fast_dev_run=true`) replaced the stage's trained
    # export with a one-batch model
    config = _config(tmp_path / "out", "reward", tiny_exports)
    export = Path(config["model"]["init_args"]["export_dir"])
    shutil.copytree(tiny_exports["reward"], export)
    before = {path.name: path.read_bytes() for path in export.iterdir()}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level("WARNING", logger="repo_lightning.models.export"):
        main(["fit", "--config", str(path), "--trainer.fast_dev_run=true"])
    assert {path.name: path.read_bytes() for path in export.iterdir()} == before
    assert f"fast_dev_run: the model is not exported to {export}" in caplog.text


def test_enough_bad_inputs_are_covered():
    assert len(CASES) >= 30


def test_report_dir_that_is_a_file_stops_evaluation_before_it_runs(tmp_path, tiny_exports, capsys):
    report = tmp_path / "report"
    report.write_text("an older report, kept")
    root = _run(tmp_path, "policy", tiny_exports, [f"--model.init_args.evaluation.report_dir={report}"], "test")
    assert not (root / "evaluation").exists() and report.read_text() == "an older report, kept"
    line = _one_error_line(capsys)
    assert f"model.init_args.evaluation.report_dir: '{report}' is a file; expected a folder" in line


def test_prompt_kind_that_is_not_a_string_stops_evaluation_before_it_runs(tmp_path, tiny_exports, capsys):
    # the evaluation groups prompts by kind: a list there was a TypeError traceback (unhashable type) after sampling
    rows = [{"prompt": "hi", "kind": "benign"}, {"prompt": "yo", "kind": ["benign"]}]
    prompts = _jsonl(tmp_path / "prompts.jsonl", rows)
    _run(tmp_path, "policy", tiny_exports, [f"--data.dataset={prompts}"], "test")
    line = _one_error_line(capsys)
    assert f"{prompts}: row 1: field 'kind': expected a string (or no such field), got ['benign']" in line


def test_other_prompts_beside_safetyworld_stop_evaluation_before_it_runs(tmp_path, tiny_exports, capsys):
    # data.dataset: safetyworld (the config's) with a test file of another task's prompts: SafetyWorld's oracle
    # scores every test prompt, and was a ValueError traceback after sampling ("names 0 topic subjects")
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "how do i bake bread"}])
    root = _run(tmp_path, "policy", tiny_exports, [f"--data.test_dataset={prompts}"], "test")
    assert not (root / "evaluation").exists()
    line = _one_error_line(capsys)
    assert f"{prompts}: row 0: not a SafetyWorld prompt (prompt 'how do i bake bread' names 0 topic subjects" in line


def test_nan_cost_model_stops_policy_evaluation(tmp_path, tiny_exports, capsys):
    cost = _nan_copy(tiny_exports["cost"], tmp_path / "cost", "score.weight", False)
    root = _run(tmp_path, "policy", tiny_exports, [f"--model.init_args.cost_model_path={cost}"], command="test")
    assert not (root / "evaluation").exists()
    line = _one_error_line(capsys)
    assert f"non-finite weights at the start of test: cost_model (model.init_args.cost_model_path='{cost}')" in line


def test_debug_shows_the_traceback(tmp_path, tiny_exports, monkeypatch):
    monkeypatch.setenv("REPO_LIGHTNING_DEBUG", "1")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path / "out", "sft", tiny_exports)))
    with pytest.raises(ValueError, match="data.val_fraction must be in"):
        main(["fit", "--config", str(config), "--data.val_fraction=2"])


def test_unexpected_errors_keep_their_traceback(tmp_path, tiny_exports, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr("repo_lightning.modules.sft.sft_loss", broken)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path / "out", "sft", tiny_exports)))
    with pytest.raises(RuntimeError, match="a bug, not a user error"):
        main(["fit", "--config", str(config)])


def test_many_unknown_tokens_warn_once_with_the_share(tmp_path, tiny_exports, caplog):
    # Real-world text tokenised with SafetyWorld's word-level tokenizer: most words are unknown to it.
    rows = [{"prompt": f"Wie backe ich Brot Nummer {i}?", "response": "Mehl, Wasser, Salz und Zeit."} for i in range(8)]
    config = _config(tmp_path / "out", "sft", tiny_exports)
    config["data"]["dataset"] = _jsonl(tmp_path / "german.jsonl", rows)
    config["trainer"]["limit_train_batches"] = 1
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level("WARNING", logger="repo_lightning.data.datamodule"):
        main(["fit", "--config", str(path)])
    warnings = [r.getMessage() for r in caplog.records if "map to the unknown token" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{tmp_path / 'german.jsonl'}: ") and "% of tokens" in warnings[0]


# --- the policy module's own checks, also when it is built without the CLI


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"update": {"actor_lr": -1.0}}, "model.init_args.update.actor_lr must be > 0, got -1.0"),
        ({"sampling": {"top_k": -1}}, "model.init_args.sampling.top_k must be >= 0"),
        (
            {"evaluation": {"samples_per_prompt": 4, "unsafe_at_k": 8}},
            "model.init_args.evaluation.unsafe_at_k (8) must be <= model.init_args.evaluation.samples_per_prompt (4)",
        ),
    ],
)
def test_policy_module_checks_its_own_arguments(tiny_exports, kwargs, message):
    from repo_lightning.errors import ConfigError
    from repo_lightning.modules import PolicyModule

    with pytest.raises(ConfigError, match=re.escape(message)):
        PolicyModule(
            actor_path=tiny_exports["sft"],
            reward_model_path=tiny_exports["reward"],
            cost_model_path=tiny_exports["cost"],
            **kwargs,
        )


def test_dual_variable_checks_its_cap():
    from repo_lightning.errors import ConfigError
    from repo_lightning.rl.dual import DualVariable

    with pytest.raises(ConfigError, match=re.escape("model.init_args.dual.init_args.maximum (1.0) must be >=")):
        DualVariable(initial=5.0, maximum=1.0)


def _huge_score_head(source: str, target: Path) -> str:
    """A reward model whose weights are finite but whose scores overflow to inf or NaN."""
    model = AutoModelForSequenceClassification.from_pretrained(source)
    with torch.no_grad():
        model.score.weight.fill_(3e38)
    model.save_pretrained(target)
    for name in Path(source).iterdir():
        if "token" in name.name:
            shutil.copy(name, target / name.name)
    return str(target)


def test_policy_nonfinite_scores_name_the_reward_model(tmp_path, tiny_exports, capsys):
    reward = _huge_score_head(tiny_exports["reward"], tmp_path / "reward")
    extra = [f"--model.init_args.reward_model_path={reward}", "--model.init_args.estimation={score_clip: null}"]
    _run(tmp_path, "policy", tiny_exports, extra)
    line = _one_error_line(capsys)
    assert "non-finite rewards" in line and f"model.init_args.reward_model_path={reward!r}" in line


def test_policy_skip_mode_skips_nonfinite_iterations(tmp_path, tiny_exports):
    reward = _huge_score_head(tiny_exports["reward"], tmp_path / "reward")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path / "out", "policy", tiny_exports)))
    extra = [f"--model.init_args.reward_model_path={reward}", "--model.init_args.estimation={score_clip: null}"]
    cli = main(["fit", "--config", str(config), *extra, "--model.init_args.on_nonfinite=skip"])
    assert float(cli.trainer.callback_metrics["train/nonfinite_skipped"]) >= 1
    assert int(cli.model.iteration) == 0  # every iteration skipped: the actor never trained on a non-finite batch
