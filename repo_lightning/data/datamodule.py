"""The one DataModule every stage shares: ``sft``, ``preference`` and ``prompts`` modes over any row source."""

from __future__ import annotations

import logging
import random
from functools import partial
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from repo_lightning.data.collate import (
    PreferenceExample,
    PromptExample,
    SFTExample,
    collate_preference,
    collate_prompts,
    collate_sft,
)
from repo_lightning.data.resumable import ResumableDataLoader, ResumableSampler
from repo_lightning.data.schema import Mode, SFTResponse, validate_rows
from repo_lightning.data.sources import LOCAL_SUFFIXES, SAFETYWORLD, SafetyWorldCache, check_source, read_rows
from repo_lightning.errors import ConfigError, DataError
from repo_lightning.safetyworld import World, WorldConfig
from repo_lightning.text.templates import SAFE_RLHF_TEMPLATE, check_template, encode_prompt, encode_response
from repo_lightning.text.tokenizers import load_tokenizer
from repo_lightning.validation import check_at_least, check_tokenizer_path, check_writable_dir

log = logging.getLogger(__name__)

#: Share of tokens mapped to the tokenizer's unk token above which the data is probably tokenised with the wrong
#: tokenizer (SafetyWorld's word-level one on real text maps most words to unk).
UNK_WARN_SHARE = 0.05


class _ListDataset(Dataset):
    def __init__(self, examples: list) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.examples[index]


class RLHFDataModule(L.LightningDataModule):
    """Prompt/response data for every stage of the pipeline.

    Args:
        mode: ``sft`` (prompt + response, loss on the response), ``preference`` (PKU-SafeRLHF pairs for the
            reward and cost models) or ``prompts`` (prompts only, left-padded, for rollouts and evaluation).
        dataset: ``safetyworld``, a ``.json``/``.jsonl``/``.parquet`` file, a dataset folder or a Hugging Face
            hub name (for example ``PKU-Alignment/PKU-SafeRLHF``).
        split: Split to read through ``datasets`` (ignored for files and SafetyWorld).
        subset: Dataset configuration name for ``datasets.load_dataset``.
        extra_train_files: Local ``.json``/``.jsonl``/``.parquet`` files whose rows (same ``mode``, same schema)
            are added to ``dataset``'s before the validation split: e.g. preference pairs labelled on a trained
            policy's own samples for a second round of reward and cost training (docs/safetyworld.md,
            "Preference rounds on the policy's samples").
        test_dataset: Source of the ``test`` stage; ``None`` means SafetyWorld's held-out evaluation prompts or
            ``dataset`` at ``test_split``.
        test_split: Split for the ``test`` stage when reading through ``datasets``.
        field_map: Contract field name -> column name in the source, e.g. ``{"prompt": "question"}``.
        sft_response: In ``sft`` mode: the ``response`` column, or the ``better`` / ``safer`` response of a
            preference row.
        world: SafetyWorld parameters (only used when ``dataset`` is ``safetyworld``).
        tokenizer: Tokenizer hub name or folder; ``None`` uses SafetyWorld's word-level tokenizer. The stage's
            LightningModule receives the same value (linked in the CLI).
        template: Prompt template with a ``{prompt}`` slot (default: safe-rlhf's conversation format) or
            ``chat`` for the tokenizer's chat template.
        max_prompt_length: Prompt tokens kept (from the right) after templating.
        max_length: Prompt + response tokens kept.
        val_fraction: Share of the training rows held out for validation (deterministic from ``seed``).
        max_rows: Use only the first ``max_rows`` rows of the source (quick runs).
        batch_size: Per-device batch size (pairs in ``preference`` mode, prompts in ``prompts`` mode).
        eval_batch_size: Batch size for validation and test; ``None`` uses ``batch_size``.
        num_workers: DataLoader workers.
        seed: Seed of the validation split and of shuffling.
        cache_dir: Where generated SafetyWorld data and its tokenizer are kept.
        trust_remote_code: Passed to the tokenizer loader.
    """

    def __init__(
        self,
        mode: Mode = "sft",
        dataset: str = SAFETYWORLD,
        split: str = "train",
        subset: str | None = None,
        extra_train_files: list[str] | None = None,
        test_dataset: str | None = None,
        test_split: str = "test",
        field_map: dict[str, str] | None = None,
        sft_response: SFTResponse = "response",
        world: WorldConfig | None = None,
        tokenizer: str | None = None,
        template: str = SAFE_RLHF_TEMPLATE,
        max_prompt_length: int = 64,
        max_length: int = 128,
        val_fraction: float = 0.1,
        max_rows: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str = ".cache/repo_lightning",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ("sft", "preference", "prompts"):
            raise ConfigError(f"data.mode must be 'sft', 'preference' or 'prompts', got {mode!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if max_prompt_length < 2 or max_length <= max_prompt_length:
            raise ConfigError(
                f"data.max_length ({max_length}) must exceed data.max_prompt_length ({max_prompt_length}) >= 2"
            )
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        check_at_least("data.eval_batch_size", eval_batch_size, 1)
        check_at_least("data.max_rows", max_rows, 1)
        check_at_least("data.num_workers", num_workers, 0)
        try:
            check_template(template)
        except ValueError as err:
            raise ConfigError(f"data.{err}") from err
        check_source("data.dataset", dataset)
        if test_dataset is not None:
            check_source("data.test_dataset", test_dataset)
        for index, path in enumerate(extra_train_files or []):
            if Path(path).suffix not in LOCAL_SUFFIXES:
                raise ConfigError(
                    f"data.extra_train_files[{index}]: expected a {'/'.join(LOCAL_SUFFIXES)} file, got {path!r}"
                )
            check_source(f"data.extra_train_files[{index}]", path)
        check_tokenizer_path("data.tokenizer", tokenizer)
        self.mode = mode
        self.dataset = dataset
        self.split = split
        self.subset = subset
        self.extra_train_files = list(extra_train_files or [])
        self.test_dataset = test_dataset
        self.test_split = test_split
        self.field_map = field_map
        self.sft_response = sft_response
        self.template = template
        self.max_prompt_length = max_prompt_length
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.max_rows = max_rows
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.world_cache = (
            SafetyWorldCache(world or WorldConfig(), cache_dir) if SAFETYWORLD in (dataset, test_dataset) else None
        )
        if self.world_cache is not None and not (self.world_cache.root / "complete").exists():
            check_writable_dir("data.cache_dir", cache_dir)
        if tokenizer is None:
            if self.world_cache is None:
                raise ConfigError(f"data.tokenizer is required for dataset {dataset!r} (a hub name or folder)")
            self.world_cache.ensure()
            tokenizer = self.world_cache.tokenizer_path
        self.tokenizer_path = tokenizer
        self._tokenizer = None
        self._unk_warned = False
        self.datasets: dict[str, Dataset] = {}

    @property
    def tokenizer(self):
        """The tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path, self.trust_remote_code)
            check_template(self.template, self._tokenizer)
        return self._tokenizer

    @property
    def oracle(self) -> World | None:
        """The ground-truth SafetyWorld when the data comes from it (its ``helpfulness``/``harm``), else ``None``."""
        return self.world_cache.world if self.world_cache is not None else None

    def prepare_data(self) -> None:
        """Generate the SafetyWorld cache once per machine (hub datasets are cached by ``datasets``)."""
        if self.world_cache is not None:
            self.world_cache.ensure()

    def _source_rows(self, dataset: str, split: str, table: str) -> tuple[list[dict], str]:
        if dataset == SAFETYWORLD:
            rows = self.world_cache.rows(table)
            source = f"safetyworld:{table}"
        else:
            rows = read_rows(dataset, split, self.subset)
            source = dataset if Path(dataset).suffix else f"{dataset}[{split}]"
        if self.max_rows is not None:
            rows = rows[: self.max_rows]
        return rows, source

    def _examples(self, rows: list[dict], source: str, mode: Mode, oracle: bool | None = None) -> list:
        clean = validate_rows(rows, mode, source, self.field_map, self.sft_response)
        tok, truncated = self.tokenizer, 0
        world = self.oracle if (source.startswith("safetyworld") if oracle is None else oracle) else None
        if not source.startswith("safetyworld") and (world is not None or (mode == "prompts" and self.oracle)):
            self._check_world_prompts(clean, source)
        examples = []
        for index, row in enumerate(clean):
            prompt_ids, cut = encode_prompt(tok, row["prompt"], self.template, self.max_prompt_length)
            budget = self.max_length - len(prompt_ids)
            truncated += cut
            if mode == "prompts":
                meta = {k: row[k] for k in ("topic", "kind") if k in row}
                examples.append(PromptExample(prompt_ids, row["prompt"], index, meta))
            elif mode == "sft":
                response_ids, cut = encode_response(tok, row["response"], budget)
                truncated += cut
                examples.append(SFTExample(prompt_ids, response_ids))
            else:
                pair = []
                for i in (0, 1):
                    response_ids, cut = encode_response(tok, row[f"response_{i}"], budget)
                    truncated += cut
                    pair.append(prompt_ids + response_ids)
                truth = {}
                if world is not None:
                    responses = (row["response_0"], row["response_1"])
                    truth["true_rewards"] = tuple(world.helpfulness(row["prompt"], r) for r in responses)
                    truth["true_costs"] = tuple(world.harm(row["prompt"], r) for r in responses)
                examples.append(
                    PreferenceExample(
                        sequences=(pair[0], pair[1]),
                        better_response_id=row["better_response_id"],
                        safer_response_id=row["safer_response_id"],
                        is_safe=(row["is_response_0_safe"], row["is_response_1_safe"]),
                        **truth,
                    )
                )
        if truncated:
            log.warning("%s: %d texts were truncated to fit max_prompt_length/max_length", source, truncated)
        self._warn_on_unk(examples, source)
        return examples

    def _check_world_prompts(self, rows: list[dict], source: str) -> None:
        """Rows of a file that SafetyWorld's ground truth will score must be SafetyWorld prompts.

        With ``data.dataset`` or ``data.test_dataset`` set to ``safetyworld``, the policy scores every prompt with
        the world's oracles (``true_*`` metrics), and preference rows added to SafetyWorld's get their true scores
        from it, so a prompt of another task would stop the run mid-way with the oracle's ``ValueError``.
        """
        for index, row in enumerate(rows):
            try:
                self.oracle.topic_of(row["prompt"])
            except ValueError as err:
                raise DataError(
                    f"{source}: row {index}: not a SafetyWorld prompt ({err}); with data.dataset or "
                    "data.test_dataset: safetyworld, SafetyWorld's ground truth scores these rows too, so they must "
                    "be SafetyWorld prompts (or take both data.dataset and data.test_dataset from files)"
                ) from err

    def _warn_on_unk(self, examples: list, source: str) -> None:
        """Warn (once per DataModule) when many tokens are unk: the tokenizer probably does not fit the text."""
        unk_id = getattr(self.tokenizer, "unk_token_id", None)
        if unk_id is None or self._unk_warned:
            return
        unk = total = 0
        for example in examples:
            for ids in _token_lists(example):
                unk += ids.count(unk_id)
                total += len(ids)
        if total and unk / total > UNK_WARN_SHARE:
            self._unk_warned = True
            log.warning(
                "%s: %.1f%% of tokens map to the unknown token %r with tokenizer %r; is data.tokenizer the one the "
                "text was written for?",
                source,
                100 * unk / total,
                self.tokenizer.unk_token,
                self.tokenizer_path,
            )

    def setup(self, stage: str | None = None) -> None:
        """Read, validate and tokenise the rows the stage needs; split off the validation set."""
        if stage in (None, "fit", "validate") and "train" not in self.datasets:
            table = {"sft": "sft", "preference": "preference", "prompts": "prompts"}[self.mode]
            rows, source = self._source_rows(self.dataset, self.split, table)
            examples = self._examples(rows, source, self.mode)
            for path in self.extra_train_files:
                examples += self._examples(read_rows(path), path, self.mode, oracle=self.dataset == SAFETYWORLD)
            order = list(range(len(examples)))
            random.Random(self.seed).shuffle(order)
            num_val = int(round(len(examples) * self.val_fraction))
            self.datasets["val"] = _ListDataset([examples[i] for i in sorted(order[:num_val])])
            self.datasets["train"] = _ListDataset([examples[i] for i in sorted(order[num_val:])])
            if len(self.datasets["train"]) == 0:
                raise ConfigError(
                    f"data.val_fraction: {self.val_fraction} of {source}'s {len(examples)} rows holds out all of them "
                    "for validation, leaving no training rows; lower data.val_fraction or give more rows"
                )
        if stage in (None, "test") and "test" not in self.datasets:
            dataset = self.test_dataset or self.dataset
            if dataset == SAFETYWORLD:
                table = {"sft": "eval_preference", "preference": "eval_preference", "prompts": "eval_prompts"}
                mode = "preference" if self.mode == "sft" else self.mode
                rows, source = self._source_rows(dataset, self.test_split, table[self.mode])
            else:
                mode = self.mode
                rows, source = self._source_rows(dataset, self.test_split, self.mode)
            self.datasets["test"] = _ListDataset(self._examples(rows, source, mode))
            self.test_mode = mode

    def _collate(self, mode: Mode):
        pad_id = self.tokenizer.pad_token_id
        return partial(
            {"sft": collate_sft, "preference": collate_preference, "prompts": collate_prompts}[mode],
            pad_id=pad_id,
        )

    def _loader(self, name: str, shuffle: bool, batch_size: int, mode: Mode) -> DataLoader:
        dataset = self.datasets[name]
        trainer = self.trainer
        world_size = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        # An explicit sampler keeps the shuffle order a function of (seed, epoch) alone, so a resumed run sees the
        # same prompts as an uninterrupted one, and each rank its own share under DDP/FSDP.
        # Training batches come from a loader whose position is saved in checkpoints, so a run killed mid-epoch
        # resumes at the batch after its last checkpoint.
        sampler_cls, loader_cls = (
            (ResumableSampler, ResumableDataLoader) if shuffle else (DistributedSampler, DataLoader)
        )
        sampler = sampler_cls(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=self.seed, drop_last=shuffle
        )
        return loader_cls(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self._collate(mode),
            num_workers=self.num_workers,
            drop_last=shuffle and len(dataset) >= batch_size * world_size,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train", True, self.batch_size, self.mode)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader("val", False, self.eval_batch_size, self.mode)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order (SafetyWorld: held-out prompts)."""
        return self._loader("test", False, self.eval_batch_size, self.test_mode)


def _token_lists(example) -> list[list[int]]:
    """The token id lists of a tokenised example (prompt, response or both sequences of a pair)."""
    if isinstance(example, PreferenceExample):
        return list(example.sequences)
    if isinstance(example, SFTExample):
        return [example.prompt_ids, example.response_ids]
    return [example.prompt_ids]
