"""The row contract (algorithm.md section 1) and its validation.

Every row is checked before anything is tokenised; the first bad row stops the run with an error that names the
source, the row index and the field, so nothing ever trains on half-read data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from repo_lightning.errors import DataError

Mode = Literal["sft", "preference", "prompts"]
SFTResponse = Literal["response", "better", "safer"]

PREFERENCE_FIELDS = (
    "prompt",
    "response_0",
    "response_1",
    "better_response_id",
    "safer_response_id",
    "is_response_0_safe",
    "is_response_1_safe",
)


class DataValidationError(DataError):
    """A row does not follow the data contract."""


def _fail(source: str, index: int, field: str, expected: str, value: object) -> DataValidationError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return DataValidationError(f"{source}: row {index}: field {field!r}: expected {expected}, got {shown}")


def _text(row: Mapping, source: str, index: int, field: str) -> str:
    if field not in row:
        raise DataValidationError(
            f"{source}: row {index}: missing field {field!r} (row has {sorted(row)}); map other column names "
            "with data.field_map"
        )
    value = row[field]
    if not isinstance(value, str):
        raise _fail(source, index, field, "a string", value)
    if field == "prompt" and not value.strip():
        raise _fail(source, index, field, "a non-empty prompt", value)
    return value


def _binary_id(row: Mapping, source: str, index: int, field: str) -> int:
    if field not in row:
        raise DataValidationError(f"{source}: row {index}: missing field {field!r}")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
        raise _fail(source, index, field, "0 or 1", value)
    return int(value)


def _flag(row: Mapping, source: str, index: int, field: str) -> bool:
    if field not in row:
        raise DataValidationError(f"{source}: row {index}: missing field {field!r}")
    value = row[field]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _fail(source, index, field, "a bool", value)


def apply_field_map(row: Mapping, field_map: Mapping[str, str] | None) -> dict:
    """Rename columns: ``field_map`` maps contract names to the source's names (``{"prompt": "question"}``)."""
    renamed = dict(row)
    for contract_name, source_name in (field_map or {}).items():
        if source_name in row:
            renamed[contract_name] = row[source_name]
    return renamed


def validate_rows(
    rows: Iterable[Mapping],
    mode: Mode,
    source: str,
    field_map: Mapping[str, str] | None = None,
    sft_response: SFTResponse = "response",
) -> list[dict]:
    """Check and normalise rows for a mode.

    Args:
        rows: Raw rows.
        mode: ``sft`` keeps ``prompt``/``response``; ``preference`` the full PKU-SafeRLHF schema; ``prompts``
            only ``prompt``.
        source: Name of the file or dataset, used in error messages.
        field_map: Contract name -> source column name.
        sft_response: For ``sft`` rows: take the ``response`` field, or the better / safer response of a
            preference row.

    Returns:
        Clean rows with the contract's fields (plus ``topic``/``kind``/``true_*`` extras when present).

    Raises:
        DataValidationError: naming the source, row index and field of the first bad row.
    """
    clean: list[dict] = []
    extras = ("topic", "kind")
    needed = {"sft": ("prompt", "response"), "preference": PREFERENCE_FIELDS, "prompts": ("prompt",)}.get(mode, ())
    if mode == "sft" and sft_response != "response":
        needed = ("prompt", "response_0", "response_1", f"{sft_response}_response_id")
    for index, raw in enumerate(rows):
        if not isinstance(raw, Mapping):
            raise DataValidationError(f"{source}: row {index}: expected an object with named fields, got {raw!r}")
        row = apply_field_map(raw, field_map)
        for name in needed:  # else "missing field 'prompt' ... map other column names with data.field_map"
            if name not in row and name in (field_map or {}):
                raise DataValidationError(
                    f"{source}: row {index}: no column {field_map[name]!r}, which data.field_map maps to {name!r} "
                    f"(row has {sorted(raw)})"
                )
        out = {"prompt": _text(row, source, index, "prompt")}
        if mode == "sft":
            if sft_response == "response":
                if "response" not in row and {"response_0", "response_1"} <= set(row):
                    raise DataValidationError(
                        f"{source}: row {index}: no 'response' field, but the row has 'response_0' and 'response_1' "
                        "(a preference row); set data.sft_response: better or safer to train on one of them"
                    )
                out["response"] = _text(row, source, index, "response")
            else:
                chosen = _binary_id(row, source, index, f"{sft_response}_response_id")
                out["response"] = _text(row, source, index, f"response_{chosen}")
        elif mode == "preference":
            out["response_0"] = _text(row, source, index, "response_0")
            out["response_1"] = _text(row, source, index, "response_1")
            out["better_response_id"] = _binary_id(row, source, index, "better_response_id")
            out["safer_response_id"] = _binary_id(row, source, index, "safer_response_id")
            out["is_response_0_safe"] = _flag(row, source, index, "is_response_0_safe")
            out["is_response_1_safe"] = _flag(row, source, index, "is_response_1_safe")
        elif mode != "prompts":
            raise ValueError(f"mode must be 'sft', 'preference' or 'prompts', got {mode!r}")
        for key in extras:  # optional labels the evaluation groups prompts by: strings, or absent / null
            if row.get(key) is not None:
                if not isinstance(row[key], str):
                    raise _fail(source, index, key, "a string (or no such field)", row[key])
                out[key] = row[key]
        clean.append(out)
    if not clean:
        raise DataValidationError(f"{source}: no rows")
    return clean
