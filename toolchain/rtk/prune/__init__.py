"""`rtk prune`: score every sublayer, search which to remove, rewrite and export the model.

`rtk.prune(recipe, out=...)` (rtk.prune.api) is the command in process: config.py (the recipe), prepare.py (the
setup prune, select and rtk ablate share), criteria.py (the criteria table: ppl, kl, bi), search.py, scoring/
(engines), select.py (selection judged after healing), run.py (the stage).
"""
from rtk import callable_stage

callable_stage(__name__)
