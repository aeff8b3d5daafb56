"""`rtk bench`: original vs pruned models: perplexity, zero-shot accuracy and speed.

`rtk.bench(baseline=..., candidates=[...], out=..., **settings)` (rtk.bench.api) is the command in process.
"""
from rtk import callable_stage

callable_stage(__name__)
