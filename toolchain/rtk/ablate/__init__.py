"""`rtk ablate`: the method, its ablations and whole-layer baselines from one base model.

- `variants`: the variants table (each names a criterion of rtk.prune.criteria), the shared score cache,
  nested prefixes;
- `run`: rtk.prune.prepare's setup once, search every variant, export and evaluate each plan (`run_ablation`);
- `measure`: `--bench`, zero-shot accuracy and served vLLM speed per exported model;
- `outputs`: OUT/ablation.{json,md}, winners and plots.
"""
