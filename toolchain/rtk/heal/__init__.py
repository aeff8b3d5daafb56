"""Healing: win back the quality pruning costs by knowledge distillation from the original model.

- `distill`: the loop (KL at a temperature + optional CE, full or LoRA, warm-up + cosine, gradient
  accumulation, checkpoints that resume to the same weights);
- `run`: healing inside `rtk prune` (`heal:` in the recipe) and `rtk heal PRUNED_DIR -o OUT`;
- `record`: loss curve, report section and model-card lines;
- `api`: `rtk.heal(pruned_dir, out=..., **settings)`, the command in process.
"""
from rtk import callable_stage

callable_stage(__name__)
