"""Rule-based reward functions for the PPO recipe tests (imported by the recipe via --reward-fn)."""


def space_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of the response's characters that are spaces: a dense, learnable rule."""
    return [r.count(" ") / max(len(r), 1) for r in responses]


_calls = {"n": 0}


def nan_once(prompts: list[str], responses: list[str]) -> list[float]:
    """space_fraction, except that the very first sample scored in the process gets NaN."""
    scores = space_fraction(prompts, responses)
    if _calls["n"] == 0:
        scores[0] = float("nan")
    _calls["n"] += 1
    return scores


def huge(prompts: list[str], responses: list[str]) -> list[float]:
    """A finite but absurd reward (1e30): its squared value error overflows to inf."""
    return [1e30 for _ in responses]
