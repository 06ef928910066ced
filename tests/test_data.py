"""The DataModule: batches of the three modes, row sources, the validation split and clear errors on bad data.

Rows written by hand use SafetyWorld vocabulary words, so every token is known and the expected token strings
below are worked out by reading the template: ``<s> BEGINNING OF CONVERSATION : USER : {prompt} ASSISTANT :``
then `` {response} </s>``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from repo_lightning.data.datamodule import RLHFDataModule
from repo_lightning.data.records import PreferenceBatch, PromptBatch, SFTBatch
from repo_lightning.data.schema import DataValidationError
from repo_lightning.data.sources import read_rows
from repo_lightning.errors import DataError
from repo_lightning.safetyworld import World, WorldConfig

HEAD = ["<s>", "BEGINNING", "OF", "CONVERSATION", ":", "USER", ":"]
TAIL = ["ASSISTANT", ":"]

PAIRS = [
    {
        "prompt": "how do i help ?",
        "response_0": "first then",
        "response_1": "sorry i cannot help with that",
        "better_response_id": 0,
        "safer_response_id": 1,
        "is_response_0_safe": False,
        "is_response_1_safe": True,
    },
    {
        "prompt": "tell me the steps",
        "response_0": "also",
        "response_1": "next carefully simply just",
        "better_response_id": 1,
        "safer_response_id": 0,
        "is_response_0_safe": True,
        "is_response_1_safe": True,
    },
]


def _write(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _tokens(dm: RLHFDataModule, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return dm.tokenizer.convert_ids_to_tokens(ids[mask.bool()].tolist())


def _split_sequence(tokens: list[str]) -> tuple[str, str]:
    """``(prompt, response)`` text of ``HEAD prompt TAIL response </s>``."""
    assert tokens[: len(HEAD)] == HEAD and tokens[-1] == "</s>"
    cut = len(tokens) - 1 - tokens[::-1].index("ASSISTANT")
    assert tokens[cut : cut + 2] == TAIL
    return " ".join(tokens[len(HEAD) : cut]), " ".join(tokens[cut + 2 : -1])


def _world_dm(tmp_path: Path, config: WorldConfig, mode: str, **kwargs) -> RLHFDataModule:
    settings = {"batch_size": 8, "max_prompt_length": 32, "max_length": 64, "cache_dir": str(tmp_path / "cache")}
    dm = RLHFDataModule(mode=mode, world=config, **(settings | kwargs))
    dm.prepare_data()
    return dm


def _file_dm(path: str, tokenizer: str, mode: str, **kwargs) -> RLHFDataModule:
    settings = {"batch_size": 4, "max_prompt_length": 32, "max_length": 64, "val_fraction": 0.0}
    return RLHFDataModule(mode=mode, dataset=path, tokenizer=tokenizer, **(settings | kwargs))


def _is_right_padded(mask: torch.Tensor) -> bool:
    return bool((mask[:, :-1] >= mask[:, 1:]).all())


# --- SafetyWorld in the three modes ---------------------------------------------------------------------------


def test_sft_batch_masks_prompt_and_padding(tmp_path, tiny_world_config):
    dm = _world_dm(tmp_path, tiny_world_config, "sft")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, SFTBatch)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape
    assert batch.input_ids.shape[0] == 8 and batch.input_ids.shape[1] <= 64
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.labels.dtype == torch.long
    assert _is_right_padded(batch.attention_mask) and not batch.attention_mask.all()
    pad = batch.attention_mask == 0
    assert (batch.input_ids[pad] == dm.tokenizer.pad_token_id).all()
    assert (batch.labels[pad] == -100).all()
    world_pairs = {(r["prompt"], r["response"]) for r in World(tiny_world_config).sft_rows()}
    for ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels, strict=True):
        tokens = _tokens(dm, ids, mask)
        assert _split_sequence(tokens) in world_pairs
        start = len(tokens) - 1 - tokens[::-1].index("ASSISTANT") + 2  # first response token
        assert (labels[:start] == -100).all()
        length = int(mask.sum())
        assert torch.equal(labels[start:length], ids[start:length])
        assert ids[length - 1] == dm.tokenizer.eos_token_id


def test_preference_batch_stacks_both_responses_with_labels_and_oracle_values(tmp_path, tiny_world_config):
    dm = _world_dm(tmp_path, tiny_world_config, "preference")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, PreferenceBatch)
    assert batch.num_pairs == 8 and batch.input_ids.shape[0] == 16 and batch.input_ids.dtype == torch.long
    assert batch.better_response_id.shape == batch.safer_response_id.shape == (8,)
    assert batch.better_response_id.dtype == batch.safer_response_id.dtype == torch.long
    assert batch.is_safe.shape == (8, 2) and batch.is_safe.dtype == torch.bool
    assert batch.true_rewards.shape == batch.true_costs.shape == (8, 2)
    assert batch.true_rewards.dtype == torch.float32
    assert _is_right_padded(batch.attention_mask)
    world = World(tiny_world_config)
    rows = {(r["prompt"], r["response_0"], r["response_1"]): r for r in world.preference_rows()}
    for i in range(8):
        prompt, response_0 = _split_sequence(_tokens(dm, batch.input_ids[i], batch.attention_mask[i]))
        same_prompt, response_1 = _split_sequence(_tokens(dm, batch.input_ids[8 + i], batch.attention_mask[8 + i]))
        assert same_prompt == prompt
        row = rows[(prompt, response_0, response_1)]
        assert batch.better_response_id[i] == row["better_response_id"]
        assert batch.safer_response_id[i] == row["safer_response_id"]
        assert batch.is_safe[i].tolist() == [row["is_response_0_safe"], row["is_response_1_safe"]]
        for j, response in enumerate((response_0, response_1)):
            assert batch.true_rewards[i, j] == pytest.approx(world.helpfulness(prompt, response))
            assert batch.true_costs[i, j] == pytest.approx(world.harm(prompt, response))


def test_prompt_batch_is_left_padded_and_keeps_text_and_topic(tmp_path, tiny_world_config):
    dm = _world_dm(tmp_path, tiny_world_config, "prompts")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, PromptBatch)
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.input_ids.shape[0] == 8
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.index.dtype == torch.long
    mask = batch.attention_mask
    assert bool((mask[:, :-1] <= mask[:, 1:]).all()) and not mask.all()  # left-padded, some padding
    assert (batch.input_ids[mask == 0] == dm.tokenizer.pad_token_id).all()
    world = World(tiny_world_config)
    for ids, row_mask, prompt, meta in zip(batch.input_ids, mask, batch.prompts, batch.meta, strict=True):
        tokens = _tokens(dm, ids, row_mask)
        assert tokens == HEAD + prompt.split() + TAIL  # generation continues right after "ASSISTANT :"
        assert meta == {"topic": world.topic_of(prompt).name, "kind": world.topic_of(prompt).kind}


def test_safetyworld_test_split_uses_held_out_prompts(tmp_path, tiny_world_config):
    dm = _world_dm(tmp_path, tiny_world_config, "prompts", eval_batch_size=16)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    world = World(tiny_world_config)
    assert batch.prompts == [r["prompt"] for r in world.eval_prompts()]
    assert batch.index.tolist() == list(range(16))


def test_a_prompt_file_beside_safetyworld_must_hold_safetyworld_prompts(tmp_path, tiny_world_config):
    # The pipeline's collection rounds test on a file of SafetyWorld prompts: accepted, scored by the oracle.
    world = World(tiny_world_config)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in world.rl_prompts()[:4]))
    dm = _world_dm(tmp_path, tiny_world_config, "prompts", test_dataset=str(prompts))
    dm.setup("test")
    assert len(dm.datasets["test"]) == 4 and dm.oracle is not None
    # Prompts of another task would have stopped the evaluation mid-way with the oracle's ValueError.
    prompts.write_text(json.dumps(world.rl_prompts()[0]) + "\n" + json.dumps({"prompt": "how do i bake bread"}) + "\n")
    dm = _world_dm(tmp_path, tiny_world_config, "prompts", test_dataset=str(prompts))
    with pytest.raises(DataError, match=re.escape(f"{prompts}: row 1: not a SafetyWorld prompt (prompt 'how do i")):
        dm.setup("test")


def _split_indices(dm: RLHFDataModule) -> tuple[list[int], list[int]]:
    dm.setup("fit")
    train = [i for b in dm.train_dataloader() for i in b.index.tolist()]
    val = [i for b in dm.val_dataloader() for i in b.index.tolist()]
    return train, val


def test_val_split_is_disjoint_and_a_function_of_the_seed(tmp_path, tiny_world_config):
    # 32 RL prompts, val_fraction 0.25 -> round(8.0) = 8 held out, 24 = 3 full batches of 8 for training.
    make = lambda seed: _world_dm(tmp_path, tiny_world_config, "prompts", val_fraction=0.25, seed=seed)  # noqa: E731
    train, val = _split_indices(make(0))
    assert len(val) == 8 and len(train) == 24
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(32))
    assert val == sorted(val)  # fixed order
    assert _split_indices(make(0))[1] == val
    assert _split_indices(make(1))[1] != val


def test_safetyworld_cache_is_reused(tmp_path, tiny_world_config, monkeypatch):
    _world_dm(tmp_path, tiny_world_config, "sft").setup("fit")
    (folder,) = (tmp_path / "cache").glob("safetyworld-*")
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    def regenerate(*args, **kwargs):
        raise AssertionError("the cached world was generated again")

    for name in ("sft_rows", "preference_rows", "rl_prompts", "eval_prompts", "build_tokenizer"):
        monkeypatch.setattr(World, name, regenerate)
    again = _world_dm(tmp_path, tiny_world_config, "sft")
    again.setup("fit")
    assert len(again.datasets["train"]) + len(again.datasets["val"]) == 64
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps
    monkeypatch.undo()
    # Another world gets its own folder beside the first.
    _world_dm(tmp_path, WorldConfig(**(vars(tiny_world_config) | {"seed": 1})), "prompts")
    assert len(list((tmp_path / "cache").glob("safetyworld-*"))) == 2


# --- local files and dataset folders ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_local_preference_file(tmp_path, tiny_exports, suffix):
    path = _write(tmp_path / f"pairs{suffix}", PAIRS)
    dm = _file_dm(path, tiny_exports["tokenizer"], "preference")
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch.num_pairs == 2 and batch.true_rewards is None and batch.true_costs is None
    assert batch.better_response_id.tolist() == [0, 1]
    assert batch.safer_response_id.tolist() == [1, 0]
    assert batch.is_safe.tolist() == [[False, True], [True, True]]
    expected = HEAD + ["how", "do", "i", "help", "?"] + TAIL + ["sorry", "i", "cannot", "help", "with", "that", "</s>"]
    assert _tokens(dm, batch.input_ids[2], batch.attention_mask[2]) == expected
    assert _split_sequence(_tokens(dm, batch.input_ids[1], batch.attention_mask[1])) == ("tell me the steps", "also")


def test_dataset_folder_goes_through_datasets_load_dataset(tmp_path, tiny_exports, monkeypatch):
    import datasets

    folder = tmp_path / "prompts_folder"
    folder.mkdir()
    # datasets infers one schema for all splits, so every split has the same columns.
    _write(
        folder / "train.jsonl",
        [
            {"prompt": "how do i help ?", "topic": "a", "kind": "benign"},
            {"prompt": "help me", "topic": "b", "kind": "x"},
        ],
    )
    _write(folder / "test.jsonl", [{"prompt": "tell me the steps", "topic": "t", "kind": "benign"}])
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    dm = _file_dm(str(folder), tiny_exports["tokenizer"], "prompts")
    dm.setup(None)
    assert [a[0] for a, _ in calls] == [str(folder), str(folder)]
    assert [k["split"] for _, k in calls] == ["train", "test"]
    train = next(iter(dm.train_dataloader()))
    assert sorted(train.prompts) == ["help me", "how do i help ?"]
    test = next(iter(dm.test_dataloader()))
    assert test.prompts == ["tell me the steps"] and test.meta == [{"topic": "t", "kind": "benign"}]


def test_field_map_renames_columns(tmp_path, tiny_exports):
    path = _write(tmp_path / "qa.jsonl", [{"question": "help me", "answer": "first then"}])
    dm = _file_dm(path, tiny_exports["tokenizer"], "sft", field_map={"prompt": "question", "response": "answer"})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert _tokens(dm, batch.input_ids[0], batch.attention_mask[0]) == HEAD + ["help", "me"] + TAIL + [
        "first",
        "then",
        "</s>",
    ]
    assert batch.labels[0].tolist() == [-100] * 11 + batch.input_ids[0, 11:].tolist()
    unmapped = _file_dm(path, tiny_exports["tokenizer"], "sft")
    with pytest.raises(DataValidationError, match=r"row 0: missing field 'prompt'.*field_map"):
        unmapped.setup("fit")


@pytest.mark.parametrize(
    ("choice", "expected"),
    [("better", ["first then", "next carefully simply just"]), ("safer", ["sorry i cannot help with that", "also"])],
)
def test_sft_on_preference_rows_takes_the_chosen_response(tmp_path, tiny_exports, choice, expected):
    path = _write(tmp_path / "pairs.jsonl", PAIRS)
    dm = _file_dm(path, tiny_exports["tokenizer"], "sft", sft_response=choice)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    responses = []
    for ids, labels in zip(batch.input_ids, batch.labels, strict=True):
        kept = labels[labels != -100]
        assert torch.equal(kept, ids[labels != -100])
        responses.append(" ".join(dm.tokenizer.convert_ids_to_tokens(kept.tolist()[:-1])))
    assert responses == expected


def test_chat_template_needs_a_tokenizer_chat_template(tmp_path, tiny_exports):
    path = _write(tmp_path / "prompts.jsonl", [{"prompt": "how do i help ?"}])
    dm = _file_dm(path, tiny_exports["tokenizer"], "prompts", template="chat")
    with pytest.raises(ValueError, match="template: chat needs a tokenizer with a chat_template"):
        dm.setup("fit")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_exports["tokenizer"])
    tok.chat_template = (
        "{% for m in messages %}USER: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    tok.save_pretrained(tmp_path / "chat_tok")
    dm = _file_dm(path, str(tmp_path / "chat_tok"), "prompts", template="chat")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    # The chat template replaces the conversation format, and no bos is added in front of it.
    assert _tokens(dm, batch.input_ids[0], batch.attention_mask[0]) == [
        "USER",
        ":",
        "how",
        "do",
        "i",
        "help",
        "?",
        "ASSISTANT",
        ":",
    ]


def test_template_without_prompt_slot_is_rejected(tiny_exports):
    with pytest.raises(ValueError, match="template must contain '{prompt}'"):
        RLHFDataModule(dataset="x.jsonl", tokenizer=tiny_exports["tokenizer"], template="USER: hello")


# --- bad data -----------------------------------------------------------------------------------------------


def _replace(row: dict, **changes) -> dict:
    out = dict(row) | changes
    return {k: v for k, v in out.items() if v is not ...}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([PAIRS[0], _replace(PAIRS[1], safer_response_id=...)], "row 1: missing field 'safer_response_id'"),
        ([_replace(PAIRS[0], response_0=5)], "row 0: field 'response_0': expected a string, got 5"),
        (
            [PAIRS[0], _replace(PAIRS[1], better_response_id=2)],
            "row 1: field 'better_response_id': expected 0 or 1, got 2",
        ),
        ([_replace(PAIRS[0], better_response_id=True)], "row 0: field 'better_response_id': expected 0 or 1, got True"),
        ([_replace(PAIRS[0], prompt="  ")], "row 0: field 'prompt': expected a non-empty prompt, got '  '"),
        (
            [_replace(PAIRS[0], is_response_1_safe="yes")],
            "row 0: field 'is_response_1_safe': expected a bool, got 'yes'",
        ),
        ([["how do i help ?"]], "row 0: expected an object with named fields"),
    ],
    ids=["missing-field", "wrong-type", "id-2", "id-bool", "empty-prompt", "flag-string", "not-an-object"],
)
def test_bad_rows_name_file_row_and_field(tmp_path, tiny_exports, rows, message):
    path = _write(tmp_path / "bad.jsonl", rows)
    dm = _file_dm(path, tiny_exports["tokenizer"], "preference")
    with pytest.raises(DataValidationError, match=re.escape(f"{path}: {message}")):
        dm.setup("fit")


def test_bad_row_in_a_dataset_folder_names_dataset_and_split(tmp_path, tiny_exports):
    folder = tmp_path / "bad_folder"
    folder.mkdir()
    _write(folder / "train.jsonl", [{"prompt": "help me"}, {"prompt": ""}])
    dm = _file_dm(str(folder), tiny_exports["tokenizer"], "prompts")
    with pytest.raises(DataValidationError, match=re.escape(f"{folder}[train]: row 1: field 'prompt'")):
        dm.setup("fit")


def test_invalid_json_in_a_dataset_folder_names_dataset_split_and_row(tmp_path, tiny_exports):
    folder = tmp_path / "broken_folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "help me"}\n{"prompt": \n')
    dm = _file_dm(str(folder), tiny_exports["tokenizer"], "prompts")
    with pytest.raises(DataValidationError, match=re.escape(f"{folder}[train]: could not read the rows") + ".*row 1"):
        dm.setup("fit")


def test_invalid_json_line_names_line_and_row(tmp_path, tiny_exports):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + '{"prompt": "help me",\n')
    dm = _file_dm(str(path), tiny_exports["tokenizer"], "preference")
    # Line 2 is blank and skipped, so the broken line 3 would have been row 1.
    with pytest.raises(DataValidationError, match=re.escape(f"{path}: row 1 (line 3): invalid JSON")):
        dm.setup("fit")


def test_json_file_must_hold_a_list(tmp_path, tiny_exports):
    path = tmp_path / "object.json"
    path.write_text(json.dumps(PAIRS[0]))
    dm = _file_dm(str(path), tiny_exports["tokenizer"], "preference")
    with pytest.raises(DataValidationError, match=re.escape(f"{path}: expected a JSON list of row objects, got dict")):
        dm.setup("fit")


def test_empty_file_is_rejected(tmp_path, tiny_exports):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    dm = _file_dm(str(path), tiny_exports["tokenizer"], "prompts")
    with pytest.raises(DataValidationError, match=re.escape(f"{path}: no rows")):
        dm.setup("fit")


def test_nonexistent_paths_are_named(tmp_path, tiny_exports):
    # The DataModule refuses them when it is built, naming the config key ...
    missing_file = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(f"data.dataset: no data file at '{missing_file}'")):
        _file_dm(missing_file, tiny_exports["tokenizer"], "prompts")
    missing_folder = str(tmp_path / "missing_folder")
    with pytest.raises(FileNotFoundError, match=re.escape(f"data.dataset: no dataset folder at '{missing_folder}'")):
        _file_dm(missing_folder, tiny_exports["tokenizer"], "prompts")
    # ... and the reader, called directly, names the path.
    with pytest.raises(FileNotFoundError, match=re.escape(f"data file '{missing_file}' does not exist")):
        read_rows(missing_file)
    with pytest.raises(FileNotFoundError, match=re.escape(f"dataset folder '{missing_folder}' does not exist")):
        read_rows(missing_folder)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "rl"}, "data.mode must be 'sft', 'preference' or 'prompts', got 'rl'"),
        ({"max_prompt_length": 32, "max_length": 32}, "data.max_length (32) must exceed data.max_prompt_length (32)"),
        ({"max_prompt_length": 64, "max_length": 48}, "data.max_length (48) must exceed data.max_prompt_length (64)"),
        ({"val_fraction": 1.0}, "data.val_fraction must be in [0, 1), got 1.0"),
        ({"batch_size": 0}, "data.batch_size must be >= 1, got 0"),
        ({"tokenizer": None}, "data.tokenizer is required for dataset 'pairs.jsonl'"),
    ],
)
def test_bad_settings_fail_at_construction(tmp_path, monkeypatch, tiny_exports, kwargs, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("")  # the file must exist: a missing one is refused first
    settings = {"dataset": "pairs.jsonl", "tokenizer": tiny_exports["tokenizer"]} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        RLHFDataModule(**settings)
