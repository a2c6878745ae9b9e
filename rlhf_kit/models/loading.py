"""Loading a causal-LM checkpoint as a reward model without a report that looks like an error.

``AutoModelForSequenceClassification.from_pretrained`` on a causal LM (the usual start of a reward
model or critic) logs a ``LOAD REPORT`` table with ``score.weight | MISSING`` and ``lm_head.weight |
UNEXPECTED``, plus a weight-loading bar: the new head is expected, not a fault. :func:`load_new_score_head`
holds that report back while loading (a filter on transformers' ``modeling_utils`` logger, bars off),
then drops it and prints one line when the only differences are the new ``score`` head and the unused
``lm_head``, and releases it unchanged otherwise, so real loading problems still show.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

REPORT_LOGGER = "transformers.modeling_utils"
NEW_HEAD = ("score.",)  # sequence-classification head: newly initialised
UNUSED = ("lm_head.",)  # the causal LM's output layer: not part of a reward model


def is_causal_lm_checkpoint(path: str) -> bool:
    """Whether ``path``'s config names a ``*ForCausalLM`` architecture (False if it cannot be read)."""
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(path).architectures or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForCausalLM") for a in architectures)


@contextmanager
def held_load_report() -> Iterator[list[logging.LogRecord]]:
    """Keep transformers' ``LOAD REPORT`` records out of the log while inside (yields them) and switch
    its progress bars off; other records of the logger pass as usual."""
    from transformers.utils import logging as hf_logging

    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    logger = logging.getLogger(REPORT_LOGGER)
    bars = hf_logging.is_progress_bar_enabled()
    logger.addFilter(hold)
    hf_logging.disable_progress_bar()
    try:
        yield held
    finally:
        logger.removeFilter(hold)
        if bars:
            hf_logging.enable_progress_bar()


def quiet_weight_progress_bars() -> bool:
    """Switch off transformers' per-file progress bars (``Loading weights``, ``Writing model shards``):
    a recipe loads and saves several models, and a dozen bars that each finish in a millisecond read like
    noise or errors; the recipes show their own progress bar for the work that takes time. Set
    ``RLHF_KIT_HF_PROGRESS=1`` to keep them. Returns whether they are now off."""
    import os

    from transformers.utils import logging as hf_logging

    if os.environ.get("RLHF_KIT_HF_PROGRESS", "") in ("1", "true", "yes"):
        return False
    hf_logging.disable_progress_bar()
    return True


def only_new_score_head(info: dict) -> bool:
    """Whether ``from_pretrained``'s loading info shows nothing but the new score head (and the unused
    ``lm_head``): no mismatched shapes, no other missing or unexpected keys."""
    missing, unexpected = info.get("missing_keys", ()), info.get("unexpected_keys", ())
    return (
        bool(missing)
        and all(k.startswith(NEW_HEAD) for k in missing)
        and all(k.startswith(UNUSED) for k in unexpected)
        and not info.get("mismatched_keys")
        and not info.get("error_msgs")
    )


def load_new_score_head(load: Callable[..., tuple], path: str):
    """``load(output_loading_info=True)`` -> ``(model, info)`` of a causal-LM checkpoint ``path`` loaded
    with a sequence-classification head; returns the model. The expected report becomes one line on
    the main process (``RANK`` 0 or unset); any other report is logged as transformers wrote it."""
    with held_load_report() as held:
        model, info = load(output_loading_info=True)
    if only_new_score_head(info):
        if int(os.environ.get("RANK", "0")) == 0:
            keys = ", ".join(sorted(info["missing_keys"]))
            print(f"{path}: causal LM loaded as a reward model; its score head ({keys}) is new and randomly "
                  "initialised, as expected (the lm_head is not used)", flush=True)  # fmt: skip
    else:
        logger = logging.getLogger(REPORT_LOGGER)
        for record in held:
            logger.handle(record)
    return model
