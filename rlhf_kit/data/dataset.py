"""Large inputs through ``datasets``: a local file, a folder of files, or a hub dataset name.

Tokenisation runs in ``Dataset.map`` (``num_proc`` workers) and is cached by ``datasets`` under the
fingerprint of the input and the tokenizer, so a second run with the same data and settings loads the
tokenised arrays from disk. Records are validated like :func:`rlhf_kit.data.formats.load_comparisons`;
errors name the source and the 1-based record number (the line number when the file has no blank
lines); lines that are not JSON are located by re-reading the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlhf_kit.data.formats import (
    NEMO,
    comparison_format,
    iter_jsonl,
    nemo_text,
    pair_from_record,
    prompt_from_record,
)
from rlhf_kit.data.tokenize import (
    TokenizeReport,
    TooLong,
    check_length_policy,
    encode_many,
    fit_pair,
    left_truncate,
    require_eos_id,
)

_EXTS = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_OK, _TRUNCATED, _DROPPED = 0, 1, 2


def data_files(path: str | os.PathLike, split: str, kind: str) -> list[str]:
    """Files of a local folder for one split and kind (``"comparisons"`` or ``"prompts"``).

    Prefers files whose names contain ``kind``; among those, the ones whose names contain ``split``.
    """
    files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and p.name.endswith(_EXTS))
    named = [f for f in files if kind in Path(f).name] or files
    chosen = [f for f in named if split in Path(f).name]
    if not chosen:
        raise ValueError(
            f"{path}: no {kind} files for split {split!r} (looked for *{split}*{{{','.join(_EXTS)}}})"
        )
    return chosen


def load_raw(path_or_name: str, split: str, kind: str, cache_dir: str | None = None) -> Any:
    """A ``datasets.Dataset`` of raw records from a file, a folder, or a hub dataset name."""
    import datasets

    if os.path.isfile(path_or_name):
        files = [path_or_name]
    elif os.path.isdir(path_or_name):
        files = data_files(path_or_name, split, kind)
    else:
        return datasets.load_dataset(path_or_name, split=split, cache_dir=cache_dir)
    try:
        ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache_dir)
    except Exception:
        for f in files:  # locate the bad line with our own reader, which names it
            for _ in iter_jsonl(f):
                pass
        raise
    if len(ds) == 0:
        raise ValueError(f"{path_or_name}: empty file (no records)")
    return ds


def _pair_nemo_rows(batch: dict[str, list], indices: list[int], source: str) -> dict[str, list]:
    texts = [nemo_text({"text": t}, f"{source}: record {i + 1}") for t, i in zip(batch["text"], indices)]
    return {"chosen": texts[0::2], "rejected": texts[1::2]}


def _tokenize_pair_rows(
    batch: dict[str, list], indices: list[int], tokenizer: Any, max_length: int, too_long: str, source: str
) -> dict[str, list]:
    eos = require_eos_id(tokenizer)
    out: dict[str, list] = {"chosen_input_ids": [], "rejected_input_ids": [], "_status": [], "_longest": []}
    keys = list(batch)
    texts: list = []
    for j, i in enumerate(indices):
        record = {k: batch[k][j] for k in keys if batch[k][j] is not None}
        texts.extend(pair_from_record(record, f"{source}: pair {i + 1}"))
    ids = encode_many(texts, tokenizer)
    for c, r in zip(ids[0::2], ids[1::2], strict=True):
        fitted = fit_pair(c, r, eos, max_length, too_long)
        out["_longest"].append(max(len(c), len(r)) + 1)
        if fitted is None:
            out["chosen_input_ids"].append([])
            out["rejected_input_ids"].append([])
            out["_status"].append(_DROPPED)
        else:
            out["chosen_input_ids"].append(fitted[0])
            out["rejected_input_ids"].append(fitted[1])
            out["_status"].append(_TRUNCATED if fitted[2] else _OK)
    return out


def _finish(ds: Any, kind: str, max_length: int, policy: str, num_proc: int) -> tuple[Any, TokenizeReport]:
    status = list(ds["_status"])
    longest = max(list(ds["_longest"]), default=0)
    dropped = sum(s == _DROPPED for s in status)
    truncated = sum(s == _TRUNCATED for s in status)
    if dropped:
        ds = ds.filter(lambda s: s != _DROPPED, input_columns="_status", num_proc=num_proc)
    ds = ds.remove_columns(["_status", "_longest"])
    report = TokenizeReport(kind, len(status), len(ds), dropped, truncated, max_length, policy, longest)
    return ds, report.log()


def load_comparisons_dataset(
    path_or_name: str,
    tokenizer: Any,
    max_length: int,
    split: str = "train",
    num_proc: int = 1,
    too_long: TooLong = "drop",
    cache_dir: str | None = None,
) -> tuple[Any, TokenizeReport]:
    """Load and tokenise comparisons through ``datasets`` (cached, ``num_proc`` workers).

    ``path_or_name``: a comparison file, a folder (its ``*{split}*comparisons*`` files), or a hub
    dataset with ``text`` (NeMo, alternating chosen/rejected) or ``chosen``/``rejected`` columns.
    Returns a ``Dataset`` with ``chosen_input_ids`` and ``rejected_input_ids`` (EOS appended; pairs too
    long for ``max_length`` dropped or truncated per ``too_long``) and the :class:`TokenizeReport`.
    """
    check_length_policy(too_long, max_length)
    source = f"{path_or_name} [{split}]"
    ds = load_raw(path_or_name, split, "comparisons", cache_dir)
    if comparison_format(dict.fromkeys(ds.column_names), source) == NEMO:
        if len(ds) % 2:
            raise ValueError(
                f"{source}: record {len(ds)}: odd number of 'text' records: "
                "the last chosen record has no rejected partner"
            )
        ds = ds.map(
            _pair_nemo_rows,
            batched=True,
            batch_size=1000,  # even, so pairs never straddle a batch
            with_indices=True,
            remove_columns=ds.column_names,
            fn_kwargs={"source": source},
            desc="pairing chosen/rejected lines",
        )
    ds = ds.map(
        _tokenize_pair_rows,
        batched=True,
        with_indices=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, too_long=too_long, source=source),
        desc="tokenising comparisons",
    )
    return _finish(ds, "pairs", max_length, too_long, num_proc if num_proc > 1 else None)


def _tokenize_prompt_rows(
    batch: dict[str, list], indices: list[int], tokenizer: Any, max_length: int, source: str
) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "_status": [], "_longest": []}
    keys = list(batch)
    prompts = [
        prompt_from_record(
            {k: batch[k][j] for k in keys if batch[k][j] is not None}, f"{source}: record {i + 1}"
        )
        for j, i in enumerate(indices)
    ]
    for ids in encode_many(prompts, tokenizer, add_generation_prompt=True):
        out["_longest"].append(len(ids))
        ids, cut = left_truncate(ids, max_length)
        out["input_ids"].append(ids)
        out["_status"].append(_TRUNCATED if cut else _OK)
    return out


def load_prompts_dataset(
    path_or_name: str,
    tokenizer: Any,
    max_length: int,
    split: str = "train",
    num_proc: int = 1,
    cache_dir: str | None = None,
) -> tuple[Any, TokenizeReport]:
    """Load and tokenise prompts through ``datasets`` (cached, ``num_proc`` workers).

    Accepts ``text``, ``prompt`` or ``messages`` columns. Returns a ``Dataset`` with ``input_ids``
    (left-truncated to ``max_length``) and the :class:`TokenizeReport` counting truncated prompts.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    source = f"{path_or_name} [{split}]"
    ds = load_raw(path_or_name, split, "prompts", cache_dir)
    ds = ds.map(
        _tokenize_prompt_rows,
        batched=True,
        with_indices=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, source=source),
        desc="tokenising prompts",
    )
    return _finish(ds, "prompts", max_length, "left-truncate", num_proc if num_proc > 1 else None)
