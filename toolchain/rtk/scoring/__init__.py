"""Scoring: PPL of the model with any set of sublayers skipped, for every candidate of a search step.

- `candidates`: what a search may remove, and parameter counts;
- `per_candidate`: one candidate after another over the model in memory (activation reuse).
"""
from .candidates import candidates, existing_names, param_count, total_params
from .per_candidate import ModelScorer



def make_scorer(model, blocks, scoring, progress: bool = True):
    """The scorer a recipe's `scoring:` section asks for."""
    from ..errors import RtkError

    if scoring.engine != "per-candidate" or scoring.offload != "none" or scoring.workers != 1:
        raise RtkError("scoring: only engine: per-candidate, offload: none, workers: 1 are available yet")
    return ModelScorer(model, blocks, scoring.batch_size, scoring.reuse_activations, progress)


__all__ = ["make_scorer", "ModelScorer", "candidates", "existing_names", "param_count", "total_params"]
