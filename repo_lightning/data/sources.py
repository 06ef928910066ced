"""Where rows come from: SafetyWorld (generated and cached), local json/jsonl/parquet files, or ``datasets``.

``dataset`` is read as follows:

* ``safetyworld`` -- the built-in task (``../docs/safetyworld.md``), generated from a :class:`WorldConfig` and
  cached on disk under ``cache_dir`` keyed by the config, so repeated runs reuse it;
* an existing ``.json`` / ``.jsonl`` / ``.parquet`` file -- read here, so errors name the line;
* anything else -- ``datasets.load_dataset(dataset, subset, split=split)``: a hub name such as
  ``PKU-Alignment/PKU-SafeRLHF`` or a local dataset folder (the same code path).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from repo_lightning.data.schema import DataValidationError
from repo_lightning.errors import ConfigError, MissingInputError
from repo_lightning.safetyworld import World, WorldConfig

SAFETYWORLD = "safetyworld"
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")

_WORLD_FILES = {
    "sft": "sft.jsonl",
    "preference": "preference.jsonl",
    "prompts": "rl_prompts.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
    "eval_preference": "eval_preference.jsonl",
}


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file; a bad line raises naming the file and line number."""
    rows, offset = [], 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, raw[err.start], offset + err.start, number + 1) from err
            offset += len(raw)
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataValidationError(f"{path}: row {len(rows)} (line {number + 1}): invalid JSON ({err})") from err
    return rows


def _not_utf8(path: Path, byte: int, offset: int, line: int) -> DataValidationError:
    return DataValidationError(
        f"{path}: not UTF-8 text (byte 0x{byte:02x} at offset {offset}, line {line}); expected a {path.suffix} "
        "file of UTF-8 JSON"
    )


def read_local_file(path: Path) -> list[dict]:
    """Read rows from a ``.json`` (a list of objects), ``.jsonl`` or ``.parquet`` file."""
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        try:
            raw = path.read_bytes()
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise _not_utf8(path, raw[err.start], err.start, raw.count(b"\n", 0, err.start) + 1) from err
        except json.JSONDecodeError as err:
            raise DataValidationError(f"{path}: invalid JSON ({err})") from err
        if not isinstance(data, list):
            raise DataValidationError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
        return data
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise DataValidationError(f"{path}: not a readable parquet file ({err})") from err
    raise DataValidationError(f"{path}: unsupported file type {path.suffix!r}; expected one of {LOCAL_SUFFIXES}")


def read_rows(dataset: str, split: str = "train", subset: str | None = None) -> list[dict]:
    """Read raw rows from a local file or through ``datasets.load_dataset`` (hub name or dataset folder)."""
    path = Path(dataset)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise MissingInputError(f"data file {dataset!r} does not exist (expected a {path.suffix} file)")
        return read_local_file(path)
    if dataset.startswith((".", "/")) and not path.exists():
        raise MissingInputError(f"dataset folder {dataset!r} does not exist")
    import datasets

    try:
        loaded = datasets.load_dataset(dataset, subset, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise MissingInputError(
            f"could not load dataset {dataset!r} (subset={subset!r}, split={split!r}): expected a Hugging Face "
            f"hub name, a dataset folder, or a {'/'.join(LOCAL_SUFFIXES)} file ({err})"
        ) from err
    except datasets.exceptions.DatasetGenerationError as err:
        # datasets' own message is only "An error occurred while generating the dataset"; the file and row that
        # failed to parse are in the chained cause.
        raise DataValidationError(f"{dataset}[{split}]: could not read the rows ({err.__cause__ or err})") from err
    return loaded.to_list()


def check_source(key: str, dataset: str) -> None:
    """Check a ``data.dataset`` value before anything is read.

    Local files and folders must exist, and a name close to ``safetyworld`` is taken for a typo of it (not for a
    hub dataset).

    Args:
        key: The config key (``data.dataset``, ``data.test_dataset``), named in the error.
        dataset: Its value.

    Raises:
        MissingInputError: a local file or folder that does not exist.
        ConfigError: a misspelt ``safetyworld``.
    """
    path = Path(dataset)
    if path.is_file() and path.suffix not in LOCAL_SUFFIXES:  # datasets' own message: "Couldn't find any data file"
        raise ConfigError(
            f"{key}: {dataset!r} is a {path.suffix or 'suffix-less'} file; expected a {'/'.join(LOCAL_SUFFIXES)} "
            "file, a dataset folder or a Hugging Face hub name"
        )
    if dataset == SAFETYWORLD or path.exists():
        return
    if path.suffix in LOCAL_SUFFIXES:
        raise MissingInputError(f"{key}: no data file at {dataset!r}")
    if dataset.startswith((".", "/", "~")) or len(path.parts) > 2:
        raise MissingInputError(f"{key}: no dataset folder at {dataset!r}")
    if "/" not in dataset and difflib.get_close_matches(dataset.lower(), [SAFETYWORLD], n=1, cutoff=0.7):
        raise ConfigError(
            f"{key}: {dataset!r} is not a file, folder or the built-in dataset; did you mean {SAFETYWORLD!r}?"
        )


def _atomic_write_jsonl(rows: list[dict], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


class SafetyWorldCache:
    """A SafetyWorld generated once per config and kept on disk (rows as JSONL, the tokenizer as HF files).

    Args:
        config: World parameters.
        cache_dir: Parent folder; the world lives in ``cache_dir/safetyworld-<hash of config>``.
    """

    def __init__(self, config: WorldConfig, cache_dir: str | Path) -> None:
        self.config = config
        key = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:12]
        self.root = Path(cache_dir) / f"safetyworld-{key}"
        self._world: World | None = None

    @property
    def world(self) -> World:
        """The world itself (its oracles score text)."""
        if self._world is None:
            self._world = World(self.config)
        return self._world

    @property
    def tokenizer_path(self) -> str:
        """Folder holding the world's ``PreTrainedTokenizerFast``."""
        return str(self.root / "tokenizer")

    def ensure(self) -> None:
        """Write the world to disk unless it is there; safe when several processes race to do it."""
        if (self.root / "complete").exists():
            return
        self.root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".safetyworld-", dir=self.root.parent))
        try:
            world = self.world
            world.build_tokenizer().save_pretrained(staging / "tokenizer")
            tables = {
                "sft": world.sft_rows(),
                "preference": world.preference_rows(),
                "prompts": world.rl_prompts(),
                "eval_prompts": world.eval_prompts(),
                "eval_preference": world.eval_preference_rows(),
            }
            for name, rows in tables.items():
                _atomic_write_jsonl(rows, staging / _WORLD_FILES[name])
            (staging / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
            (staging / "complete").write_text("ok\n")
            try:
                staging.rename(self.root)
            except OSError:
                if not (self.root / "complete").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def rows(self, table: str) -> list[dict]:
        """Rows of one table: ``sft``, ``preference``, ``prompts``, ``eval_prompts`` or ``eval_preference``."""
        if table not in _WORLD_FILES:
            raise KeyError(f"unknown SafetyWorld table {table!r}; expected one of {sorted(_WORLD_FILES)}")
        self.ensure()
        return read_jsonl(self.root / _WORLD_FILES[table])
