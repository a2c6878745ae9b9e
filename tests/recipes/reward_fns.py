"""Rule-based reward functions for the PPO recipe tests (imported by the recipe via --reward-fn)."""


def space_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of the response's characters that are spaces: a dense, learnable rule."""
    return [r.count(" ") / max(len(r), 1) for r in responses]
