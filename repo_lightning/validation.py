"""Range checks of config values, done where a value is declared, with errors in the config's own key names.

Each check takes the key as the user writes it (``model.init_args.actor_lr``, ``data.val_fraction``) and raises
:class:`~repo_lightning.errors.ConfigError` with that key, the rule and the value given, so a wrong setting stops the
run before any folder is written. NaN fails every range check (``not nan > 0``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from repo_lightning.errors import ConfigError, MissingInputError


def check_positive(key: str, value: float | None) -> None:
    """``value > 0`` (``None`` means unset and passes)."""
    if value is not None and not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def check_non_negative(key: str, value: float | None) -> None:
    """``value >= 0`` (``None`` passes)."""
    if value is not None and not value >= 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")


def check_finite(key: str, value: float | None) -> None:
    """``value`` is a finite number (``None`` passes)."""
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")


def check_probability(key: str, value: float | None, open_low: bool = False) -> None:
    """``value`` in ``[0, 1]`` (``(0, 1]`` with ``open_low``; ``None`` passes)."""
    if value is None:
        return
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value <= 1):
        raise ConfigError(f"{key} must be in {'(0' if open_low else '[0'}, 1], got {value}")


def check_at_least(key: str, value: float | None, minimum: float, minimum_key: str | None = None) -> None:
    """``value >= minimum``; ``minimum_key`` names the setting the minimum comes from (``data.max_prompt_length``)."""
    if value is None or value >= minimum:
        return
    bound = f"{minimum_key} ({minimum})" if minimum_key else f"{minimum}"
    raise ConfigError(f"{key} must be >= {bound}, got {value}")


#: The seeds ``seed_everything`` accepts (numpy's range).
MAX_SEED = 2**32 - 1


def check_seed(key: str, seed: int) -> None:
    """A seed in ``[0, 2**32 - 1]``, the range ``lightning.seed_everything`` (numpy) accepts."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{key} must be in [0, {MAX_SEED}] (the seeds numpy accepts), got {seed}")


def check_optimizer(key: str, optimizer: Callable) -> None:
    """Check the learning rate of an optimizer factory from the config (``functools.partial`` with ``lr``).

    Args:
        key: The factory's key, e.g. ``model.init_args.optimizer``; the error names ``<key>.init_args.lr``.
        optimizer: The factory; one without readable keywords (a plain class) is not checked.
    """
    lr = getattr(optimizer, "keywords", {}).get("lr")
    if lr is not None and not isinstance(lr, bool) and isinstance(lr, int | float):
        check_positive(f"{key}.init_args.lr", lr)


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local file or folder rather than a Hugging Face hub repository (``owner/name``).

    Absolute, ``./``, ``../`` and ``~`` paths are local, as is anything with more than one ``/`` or whose first
    component exists here (``lightning_logs/demo/exports/sft``); ``owner/name`` with no such folder is a hub name.
    """
    if path.startswith(("/", "./", "../", "~")) or path in (".", ".."):
        return True
    parts = Path(path).parts
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists()) or Path(path).exists()


def check_model_path(key: str, path: str | None) -> None:
    """A model given as a local folder must exist and hold a ``config.json`` (hub names are left to the loader).

    Raises:
        MissingInputError: ``<key>: no model at '<path>' (...)``.
    """
    if path is None:
        return
    if not looks_local(path):
        _check_offline_hub_model(key, path)
        return
    folder = Path(os.path.expanduser(path))
    if not folder.exists():
        raise MissingInputError(f"{key}: no model at {path!r} (no such folder); train that stage first or fix the path")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise MissingInputError(
            f"{key}: no model at {path!r} (expected a folder written by save_pretrained, with a config.json)"
        )
    try:
        json.loads((folder / "config.json").read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MissingInputError(
            f"{key}: {str(folder / 'config.json')!r} is not valid JSON ({err}); a truncated or hand-edited export? "
            "write the folder again with save_pretrained"
        ) from err


def _check_offline_hub_model(key: str, name: str) -> None:
    """Offline, a hub name must already be in the local cache (else the loader's message names no key)."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    if is_offline_mode() and try_to_load_from_cache(name, "config.json") is None:
        raise MissingInputError(
            f"{key}: no model at {name!r}: no such local folder, and no cached hub repository of that name "
            "(HF_HUB_OFFLINE is set)"
        )


def check_export_dir(key: str, path: str | None, inputs: dict[str, str | None] | None = None) -> None:
    """An export folder may be new, empty or a previous model export; anything else would be replaced, so refuse it.

    An export replaces its folder as a whole (:func:`repo_lightning.models.export.export_pretrained`), so a typo
    such as ``export_dir: .`` or a data folder must stop the run before training, not delete the folder after it.

    Args:
        key: The setting's name (``model.init_args.export_dir``).
        path: The folder, or ``None`` (no export).
        inputs: The stage's input models by key; exporting onto one of them would replace it.

    Raises:
        ConfigError: for a file, a folder that holds something other than a model, or one of the stage's inputs.
    """
    if path is None:
        return
    folder = Path(os.path.expanduser(str(path)))
    if not folder.exists():
        return
    for input_key, input_path in (inputs or {}).items():
        source = Path(os.path.expanduser(str(input_path))) if input_path else None
        if source is not None and source.exists() and source.resolve() == folder.resolve():
            raise ConfigError(
                f"{key}: {str(path)!r} is this stage's input ({input_key}); exporting there would replace it; "
                "choose another folder"
            )
    refusal = export_dir_refusal(folder)
    if refusal:
        raise ConfigError(f"{key}: {refusal}")


def check_export_stage(key: str, path: str | None, stage: str | None) -> None:
    """An export folder that holds another stage's export (its ``repo_lightning.json``) is not replaced.

    ``export_dir: lightning_logs/demo/exports/reward`` in the cost config, say, would replace the trained reward
    model with a cost model, which the policy stage would then read as its reward model.

    Raises:
        ConfigError: ``<key>: '...' holds the reward stage's export; this is the cost stage; ...``.
    """
    if path is None or stage is None:
        return
    record = Path(os.path.expanduser(str(path))) / "repo_lightning.json"
    try:
        previous = json.loads(record.read_text()).get("stage")
    except (OSError, ValueError, AttributeError):  # no record (a new folder, a hub download): nothing to compare
        return
    if isinstance(previous, str) and previous != stage:
        raise ConfigError(
            f"{key}: {str(path)!r} holds the {previous} stage's export (its repo_lightning.json); this is the "
            f"{stage} stage, and exporting there would replace it; choose another folder"
        )


def export_dir_refusal(folder: Path) -> str | None:
    """Why ``folder`` must not be replaced by an export, or ``None`` if it may (new, empty, or a model)."""
    if not folder.exists() or (folder / "config.json").is_file():
        return None
    if not folder.is_dir():
        return f"{str(folder)!r} is a file; expected a folder to write the model to"
    entries = sorted(entry.name for entry in folder.iterdir())
    if not entries:
        return None
    shown = ", ".join(entries[:4]) + (f", ... ({len(entries)} entries)" if len(entries) > 4 else "")
    return (
        f"{str(folder)!r} holds files that are not a model export ({shown}); an export replaces its folder as a "
        "whole, so it refuses one that is not empty and has no config.json; choose a new or empty folder"
    )


def check_writable_dir(key: str, path: str | os.PathLike | None) -> None:
    """A folder the run writes (made if missing) must be makeable: its nearest existing ancestor a writable folder.

    Checked before the run, so a read-only or mistyped output folder stops it with one line instead of an
    ``OSError`` traceback, for an export or report folder after the whole training or evaluation. The check makes
    and removes an empty folder in that ancestor (file modes alone miss read-only mounts and do not bind root).

    Raises:
        ConfigError: ``<key>: cannot write '<path>': '<ancestor>' is a file`` or ``... is not writable (...)``.
    """
    if path is None or "://" in str(path):  # remote storage (s3://, ...) is left to its library
        return
    ancestor = Path(os.path.expanduser(str(path))).absolute()
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{key}: cannot write {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".repo_lightning-write-check-", dir=ancestor))
    except OSError as err:
        raise ConfigError(
            f"{key}: cannot write {str(path)!r}: no folder can be made in {str(ancestor)!r} ({err.strerror or err})"
        ) from err


def check_tokenizer_path(key: str, path: str | None) -> None:
    """A tokenizer given as a local folder must exist, and be a folder (not its ``tokenizer.json``)."""
    if path is None or not looks_local(path):
        return
    folder = Path(os.path.expanduser(path))
    if folder.is_file():
        raise ConfigError(
            f"{key}: {path!r} is a file; expected the folder that holds it, as written by save_pretrained "
            f"({str(folder.parent)!r}?)"
        )
    if not folder.is_dir():
        raise MissingInputError(f"{key}: no tokenizer at {path!r} (no such folder)")


def check_vocabulary(key: str, path: str | None, model, tokenizer, tokenizer_path: str | None) -> None:
    """A loaded model must have an embedding row for every id of the tokenizer it is trained or run with.

    A tokenizer larger than the model's embedding (another model's, or SafetyWorld's of another world) gives ids
    past its end: an index error mid-step on CPU, a device-side assert on GPU, and an export whose tokenizer does not
    fit its model.

    Args:
        key: The model's setting (``model.init_args.model_name_or_path``), named in the error.
        path: The model's folder or hub name; ``None`` (a model built from ``model_config``) is not checked.
        model: The loaded model.
        tokenizer: The stage's tokenizer.
        tokenizer_path: Where the tokenizer came from (``data.tokenizer``), named in the error.

    Raises:
        ConfigError: ``data.tokenizer: '...' has N tokens, but <key> ('...') has embeddings for M; ...``.
    """
    if path is None:
        return
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"data.tokenizer: {tokenizer_path!r} has {len(tokenizer)} tokens, but {key} ({path!r}) has embeddings "
            f"for {rows}; use the tokenizer the model was trained with (the one saved in its folder)"
        )


_LM_HEADS = ("ForCausalLM", "LMHeadModel")
_SCORE_HEADS = ("ForSequenceClassification", "ForScore")


def check_model_kind(key: str, path: str | None, model, kind: str) -> None:
    """A saved model given where the other kind is expected: the SFT export as a reward model, or the reverse.

    ``from_pretrained`` loads either one as the other without an error, with the missing head (a score head, or the
    language-model head) at random weights, so the policy would train against a random reward, or start from a
    random policy. ``config.architectures`` (what the folder was saved as) tells them apart; a folder without it,
    or of an architecture known as neither, passes.

    Args:
        key: The model's setting (``model.init_args.reward_model_path``).
        path: Its folder or hub name.
        model: The loaded model (its config keeps the saved ``architectures``).
        kind: ``causal_lm`` (the actor) or ``score`` (a reward or cost model).

    Raises:
        ConfigError: ``<key>: '...' holds a LlamaForCausalLM (a language model), not a score model; ...``.
    """
    saved = list(getattr(model.config, "architectures", None) or [])
    is_lm = any(a.endswith(_LM_HEADS) for a in saved)
    is_score = any(a.endswith(_SCORE_HEADS) for a in saved)
    if kind == "score" and is_lm and not is_score:
        raise ConfigError(
            f"{key}: {path!r} holds a {saved[0]} (a language model), not a score model (*ForSequenceClassification): "
            "its score head would be random weights; give the reward or cost stage's export"
        )
    if kind == "causal_lm" and is_score and not is_lm:
        raise ConfigError(
            f"{key}: {path!r} holds a {saved[0]} (a score model), not a causal language model: its language-model "
            "head would be random weights; give the SFT stage's export"
        )


def learned_position_limit(config) -> int | None:
    """The most tokens a model of ``config`` reads, if it learns one embedding per position (else ``None``).

    GPT-2's ``wpe`` and OPT's ``embed_positions`` end at ``max_position_embeddings``; rotary or ALiBi positions have
    no hard end. The model is built on the meta device (no memory, no weights) to see its modules; a config that
    cannot be built that way (custom code, ...) gives ``None``.
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # the check must never stop a run that would work
        return None
    inputs = model.get_input_embeddings()
    for name, module in model.named_modules():
        last = name.rpartition(".")[2]
        if isinstance(module, torch.nn.Embedding) and module is not inputs and ("wpe" in last or "pos" in last):
            return getattr(config, "max_position_embeddings", None)
    return None


def check_position_limit(length_key: str, length: int, shown: str, model_key: str, config) -> None:
    """Inputs of ``length`` tokens must fit a model with learned positions.

    Else the first long batch indexes past the position embeddings: an ``IndexError`` mid-step on CPU, a
    device-side assert on GPU.

    Args:
        length_key: The setting(s) that give the length (``data.max_length``).
        length: The longest input.
        shown: How the length is shown (``48``, ``32 + 64 = 96``).
        model_key: The model's setting (``model.init_args.actor_path``).
        config: The model's Hugging Face config.

    Raises:
        ConfigError: ``data.max_length (48) exceeds the 32 positions of model.init_args.model_config (gpt2) ...``.
    """
    limit = learned_position_limit(config)
    if limit is not None and length > limit:
        raise ConfigError(
            f"{length_key} ({shown}) exceeds the {limit} positions of {model_key} ({config.model_type}, which learns "
            "an embedding for each position); lower it"
        )


def validate_stage_args(
    optimizer: Callable, warmup_steps: int, regularization: float = 0.0, oracle_margin: float = 0.0
) -> None:
    """Ranges of the SFT, reward and cost modules' numeric arguments (``model.init_args.*``)."""
    prefix = "model.init_args"
    check_optimizer(f"{prefix}.optimizer", optimizer)
    check_non_negative(f"{prefix}.warmup_steps", warmup_steps)
    check_non_negative(f"{prefix}.regularization", regularization)
    check_non_negative(f"{prefix}.oracle_margin", oracle_margin)


def check_checkpoint_file(key: str, path: str) -> None:
    """A checkpoint file must be what ``torch.save`` writes (a zip archive); a folder (a sharded checkpoint) passes.

    Raises:
        ConfigError: ``<key>: '<path>' is not a PyTorch checkpoint (...)`` for a truncated, corrupt or other file.
    """
    file = Path(path)
    if file.is_file() and not zipfile.is_zipfile(file):
        raise ConfigError(
            f"{key}: {path!r} is not a PyTorch checkpoint (not the zip archive torch.save writes: truncated, "
            "corrupt or another kind of file); give a .ckpt written by this stage"
        )


def check_checkpoint_matches(module, checkpoint: dict, key: str = "ckpt_path") -> None:
    """The weights of ``checkpoint`` must be those ``module`` trains: the same names and shapes.

    Called from the modules' ``on_load_checkpoint`` (after ``configure_model``, before the weights are loaded), so a
    checkpoint of another stage or of a differently shaped model stops with one line instead of a ``load_state_dict``
    traceback, or (for the policy, which loads non-strictly because its frozen models are not stored) instead of a
    run that resumes with none of its weights restored. Sharded checkpoints (no plain ``state_dict``) are not checked.

    Raises:
        ConfigError: ``ckpt_path: the checkpoint does not hold this stage's weights: ...``.
    """
    stored = checkpoint.get("state_dict")
    if not isinstance(stored, dict) or not stored:
        return
    expected = module.state_dict()
    missing = [name for name in expected if name not in stored]
    unexpected = [name for name in stored if name not in expected]
    reshaped = [
        f"{name} {tuple(stored[name].shape)} vs {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in stored
        and type(tensor) is torch.Tensor  # a DTensor's local shape differs; not compared
        and hasattr(stored[name], "shape")
        and tuple(stored[name].shape) != tuple(tensor.shape)
    ]
    if not (missing or unexpected or reshaped):
        return

    def listed(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")

    problems = []
    if missing:
        problems.append(f"lacks {listed(missing)}")
    if unexpected:
        problems.append(f"has {listed(unexpected)} that {type(module).__name__} does not")
    if reshaped:
        problems.append(f"has other shapes (stored vs this model): {listed(reshaped)}")
    raise ConfigError(
        f"{key}: the checkpoint does not hold this stage's weights ({type(module).__name__}): it "
        + "; it ".join(problems)
        + "; is it a checkpoint of another stage or model size?"
    )
