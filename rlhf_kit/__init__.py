"""rlhf_kit: composable PPO and reward-model building blocks on the Hugging Face stack.

Import the pieces from their modules (``rlhf_kit.advantages``, ``rlhf_kit.losses``, ...); this
top-level module stays light so that ``import rlhf_kit`` is cheap.
"""

from importlib import resources as _resources

__version__ = "0.1.0"


def default_hh_file() -> str:
    """Path of the shipped Anthropic HH sample (harmless-base test split, 2,312 pairs, MIT)."""
    return str(_resources.files("rlhf_kit") / "assets" / "hh" / "harmless-base-test.jsonl.gz")
