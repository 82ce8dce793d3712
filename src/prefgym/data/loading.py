"""Load and validate AlpacaFarm-format records from local files, `datasets` folders or the Hub.

A record is a dict with AlpacaFarm/AlpacaEval field names: `instruction`, `input`, `output`,
`output_1`, `output_2`, `preference`, `generator`, ... Every source ends in the same
validation, which raises `DataError` naming the file, the row and the field.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefgym.data.preferences import parse_preference
from prefgym.errors import DataError
from prefgym.io import read_records

STRING_FIELDS = ("instruction", "input", "output", "output_1", "output_2", "generator",
                 "generator_1", "generator_2", "annotator", "dataset")
LIST_OF_STRING_FIELDS = ("outputs",)


def load_records(source: str | os.PathLike, split: str | None = None,
                 required: tuple[str, ...] = ("instruction", "output"),
                 config: str | None = None) -> list[dict]:
    """Load validated records from `source`.

    `source` is one of:
      - a `.json` file (a list of objects) or a `.jsonl` file (one object per line);
      - a folder written by `datasets.save_to_disk` (a Dataset, or a DatasetDict with `split`);
      - a folder holding `<split>.json` / `<split>.jsonl` (or `data/<split>.json`, as the
        built-in world writes);
      - a Hugging Face Hub dataset name, optionally `name:config`, e.g.
        `tatsu-lab/alpaca_farm:alpaca_instructions` with split `sft`, `preference`,
        `unlabeled` or `val`, or `tatsu-lab/alpaca_farm:alpaca_farm_evaluation` split `eval`.

    Every record must have the `required` fields; `input` is optional and filled with "".
    Raises DataError naming the file, row and field of the first problem.
    """
    path = Path(source)
    if path.is_file():
        rows = read_records(path)
    elif path.is_dir():
        rows, path = _load_dir(path, split)
    elif _looks_like_local_path(str(source)):
        raise DataError("file not found", path=path)
    else:
        rows = _load_hub(str(source), split, config)
        path = f"{source}" + (f" split {split}" if split else "")
    return validate_records(rows, required=required, path=path)


def validate_records(rows: list, required: tuple[str, ...] = ("instruction", "output"),
                     path=None) -> list[dict]:
    """Check each row and return copies with `input` normalised to a string ("" if absent).

    Raises DataError (naming `path`, the row and the field) for rows that are not objects,
    missing required fields, fields of the wrong type, preferences that mean nothing (see
    `prefgym.data.preferences`: 7, -1, "2", true) and empty instructions.
    """
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"expected an object, got {type(row).__name__}", path=path, row=i)
        for field in required:
            if field not in row:
                have = ", ".join(sorted(row)) or "none"
                raise DataError(f"missing required field (fields present: {have})",
                                path=path, row=i, field=field)
        for field in STRING_FIELDS:
            value = row.get(field)
            if field == "input" and value is None:
                continue
            if field in row and not isinstance(value, str):
                raise DataError(f"expected a string, got {_type_name(value)}", path=path, row=i, field=field)
        if "preference" in row:  # what the value means: prefgym.data.preferences
            parse_preference(row["preference"], row=i, path=path)
        for field in LIST_OF_STRING_FIELDS:
            value = row.get(field)
            if field in row and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise DataError(f"expected a list of strings, got {_type_name(value)}", path=path, row=i, field=field)
        if "instruction" in row and not row["instruction"].strip():
            raise DataError("empty instruction", path=path, row=i, field="instruction")
        out.append({**row, "input": row.get("input") or ""})
    return out


def _load_dir(path: Path, split: str | None) -> tuple[list[dict], Path]:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return _load_saved_dataset(path, split), path
    if split is None:
        raise DataError("is a folder; name the split to load (e.g. --split sft)", path=path)
    for folder in (path, path / "data"):
        for suffix in (".json", ".jsonl"):
            candidate = folder / f"{split}{suffix}"
            if candidate.is_file():
                return read_records(candidate), candidate
    raise DataError(f"no {split}.json or {split}.jsonl in this folder (or in its data/ folder)", path=path)


def _load_saved_dataset(path: Path, split: str | None) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise DataError(f"choose a split with --split: one of {', '.join(ds)}"
                            + (f" (not '{split}')" if split else ""), path=path)
        ds = ds[split]
    return ds.to_list()


def _load_hub(name: str, split: str | None, config: str | None) -> list[dict]:
    import datasets

    if ":" in name and config is None:
        name, config = name.split(":", 1)
    if split is None:
        raise DataError("name the split to load from a Hub dataset (e.g. --split sft)", path=name)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name/config/split: all user-fixable
        raise DataError(f"could not load Hub dataset (config {config!r}, split {split!r}): {e}. "
                        "Check the name, or download it and pass a local file or "
                        "save_to_disk folder", path=name) from None
    return ds.to_list()


def _looks_like_local_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((".json", ".jsonl"))


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__
