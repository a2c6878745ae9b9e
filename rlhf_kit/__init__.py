"""rlhf_kit: composable PPO and reward-model building blocks on the Hugging Face stack.

Import the pieces from their modules (``rlhf_kit.advantages``, ``rlhf_kit.losses``, ...); this
top-level module stays light so that ``import rlhf_kit`` is cheap.
"""

import logging as _logging
from importlib import resources as _resources

__version__ = "0.1.0"


class _KnownImportNoise(_logging.Filter):
    """Drops two messages that reach every run once torchao (the ``[lowbit]`` extra) is installed, since
    transformers imports it at start-up: one line per prebuilt torchao CUDA kernel that this torch build
    cannot load (rlhf_kit uses none of them), and torch's deprecation note about how torchao registers
    its enums. Everything else those loggers say still shows."""

    _NOISE = ("Failed to load ", "is an Enum subclass and is now natively supported")

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self._NOISE)


for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).addFilter(_KnownImportNoise())


def default_hh_file() -> str:
    """Path of the shipped Anthropic HH sample (harmless-base test split, 2,312 pairs, MIT)."""
    return str(_resources.files("rlhf_kit") / "assets" / "hh" / "harmless-base-test.jsonl.gz")
