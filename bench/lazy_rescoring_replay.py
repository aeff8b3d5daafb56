"""Replays lazy re-scoring on a full progressive search's recorded scores (plan.json `steps` hold every
candidate's NRI at every step of the full path): while a lazy variant picks what full picks, the scores it would
ask for are exactly the recorded ones, so whether (and where) it diverges, and its evaluations up to there, are
exact without running a model. Variants: LAZY_BATCH 1 or 4; `window` re-scores every candidate within that many
layers of the last removal unconditionally.

Usage: python bench/lazy_rescoring_replay.py [PLAN_JSON] (default: bench/results/search-cost/check-plan.json)"""
import json
import sys
from pathlib import Path

p = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else
                    Path(__file__).resolve().parent / "results" / "search-cost" / "check-plan.json").read_text())
steps = p["steps"]
order_full = [e["name"] for e in p["removed"]]
cands = list(steps[0]["scores"].keys())
idx = {n: i for i, n in enumerate(cands)}
layer = lambda n: int(n.split(".")[1])
def key(n, nri): return (nri, idx[n])
def sim(batch=4, window=None):
    last = {n: s["nri"] for n, s in steps[0]["scores"].items()}
    evals = len(cands)
    for t in range(1, len(steps)):
        full = steps[t]["scores"]
        remaining = list(full.keys())
        prev = order_full[t - 1]
        fresh = {}
        if window is not None:
            loc = [n for n in remaining if abs(layer(n) - layer(prev)) <= window]
            for n in loc: fresh[n] = full[n]["nri"]
        order = sorted(remaining, key=lambda n: key(n, last[n]))
        while True:
            nxt = [n for n in order if n not in fresh]
            if fresh and (not nxt or key(*min(fresh.items(), key=lambda kv: key(*kv))) <= key(nxt[0], last[nxt[0]])):
                break
            for n in nxt[:batch]: fresh[n] = full[n]["nri"]
        evals += len(fresh)
        pick = min(fresh.items(), key=lambda kv: key(*kv))[0]
        if pick != order_full[t]:
            return f"diverges at step {t}: picks {pick}, full {order_full[t]}; evals so far {evals}"
        last.update(fresh)
    return f"identical; evals {evals} (full {sum(len(s['scores']) for s in steps)})"
for b in (1, 4):
    for w in (None, 0, 1, 2, 3):
        print("batch", b, "window", w, sim(b, w))
