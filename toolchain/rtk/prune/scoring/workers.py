"""`scoring.workers: N`: N Ray actors, each with its own model replica or offloaded streamer, share every
search step's candidates; the driver picks the removal and sends the removed set with the next step.

`scoring.ray_address` joins an existing cluster (`ray start --head` on one node, `ray start --address`
on the others); without it a local Ray instance starts. Every node needs rtk installed and the model at
the same path (a shared file system, or a hub id each node can fetch). With `device: cuda` each actor
takes one GPU, so N workers on one node spread the candidate groups over N GPUs.

The candidates of a step are sorted by layer and dealt out in turn (worker k takes every N-th), so each
worker gets early and late layers alike; each candidate's PPL is computed exactly as one worker would,
so N workers give the same plan as one (tested).
"""
from __future__ import annotations

import os
import time
from typing import Optional

from tqdm.auto import tqdm

from rtk import pip_install
from rtk.errors import RtkError


def _ray():
    try:
        import ray
    except ImportError:
        raise RtkError(f"scoring.workers: more than 1 needs Ray ({pip_install('ray')})") from None
    return ray


def _unwrap(exc: Exception) -> Exception:
    """A worker's RtkError comes back as one line; anything else keeps Ray's message."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RtkError):
        return RtkError(cause.message)
    return RtkError(f"scoring.workers: a Ray worker failed ({type(cause or exc).__name__}: "
                    f"{str(cause or exc).strip().splitlines()[-1] if str(cause or exc).strip() else ''})")


class _Worker:
    """Runs inside a Ray actor: opens the model as the recipe says and scores the token blocks it is given."""

    def __init__(self, recipe, device: str, threads: Optional[int]):
        """recipe: the driver's Recipe, pickled by Ray (its class travels by reference, so this module need not
        import the recipe's)."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.recipe = recipe.model_copy(update={"device": device,
                                                "scoring": recipe.scoring.model_copy(update={"workers": 1,
                                                                                              "ray_address": None})})
        from rtk.prune.scoring import load_for_scoring

        self.loaded = load_for_scoring(self.recipe)
        self.scorers = {}

    def ready(self) -> str:
        import socket

        return socket.gethostname()

    def setup(self, name: str, blocks, ppl_only: bool = False) -> None:
        from rtk.prune.scoring import scorer_for

        self.scorers[name] = scorer_for(self.recipe, self.loaded, blocks, progress=False, ppl_only=ppl_only)

    def ppl(self, name: str, removed) -> float:
        return self.scorers[name].ppl(frozenset(removed))

    def score(self, name: str, removed, cands) -> dict:
        return self.scorers[name].score(frozenset(removed), list(cands))

    def stats(self, name: str) -> dict:
        s = self.scorers[name]
        return {"evaluations": s.evaluations, "seconds": s.seconds}


class WorkerPool:
    """N actors over a local or existing Ray cluster; `close` ends them (and a Ray instance rtk started)."""

    def __init__(self, recipe, n: int, address: Optional[str] = None, echo=print):
        ray = _ray()
        self.ray = ray
        self.started = False
        cuda = str(recipe.device).startswith("cuda")
        if not ray.is_initialized():
            kw = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            try:
                if address:
                    ray.init(address=address, **kw)
                else:
                    ray.init(num_cpus=max(n, os.cpu_count() or 1), **kw)
            except Exception as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise RtkError(f"scoring.ray_address: cannot start or join {where} "
                               f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
            self.started = True
        per_cpu = max(1, int(ray.cluster_resources().get("CPU", 1)) // n) if not cuda else None
        if cuda and ray.cluster_resources().get("GPU", 0) < n:
            raise RtkError(f"scoring.workers: {n} workers with device: {recipe.device} need {n} GPUs; the Ray "
                           f"cluster has {int(ray.cluster_resources().get('GPU', 0))}")
        opts = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": per_cpu}
        actor = ray.remote(**opts)(_Worker)
        device = "cuda:0" if cuda else "cpu"  # an actor sees only its own GPU
        t0 = time.perf_counter()
        self.actors = [actor.remote(recipe, device, per_cpu) for _ in range(n)]
        hosts = self.get([a.ready.remote() for a in self.actors])
        echo(f"rtk: {n} Ray workers ready in {time.perf_counter() - t0:.0f}s on {', '.join(sorted(set(hosts)))}"
             f" ({'1 GPU' if cuda else f'{per_cpu} CPU'} each)")

    def get(self, refs):
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as exc:
            raise _unwrap(exc) from None

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            self.ray.kill(a)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False


class RayScorer:
    """The scorer interface (ppl, score) over a WorkerPool; the token blocks are sent once."""

    def __init__(self, pool: WorkerPool, name: str, blocks, progress: bool = True, ppl_only: bool = False):
        self.pool, self.name = pool, name
        actors = pool.actors[:1] if ppl_only else pool.actors  # ppl() is asked of the first worker only
        pool.get([a.setup.remote(name, blocks, ppl_only) for a in actors])
        self.n_tokens = int(blocks.shape[0] * (blocks.shape[1] - 1))
        self.progress = progress
        self.calls_seconds = 0.0

    def ppl(self, removed=frozenset()) -> float:
        return self.pool.get(self.pool.actors[0].ppl.remote(self.name, sorted(removed)))

    def score(self, removed, cands, desc: Optional[str] = None) -> dict:
        t0 = time.perf_counter()
        order = sorted(cands, key=lambda c: c.layer)
        n = len(self.pool.actors)
        shares = [order[k::n] for k in range(n)]
        pending = {a.score.remote(self.name, sorted(removed), share): len(share)
                   for a, share in zip(self.pool.actors, shares) if share}
        out = {}
        bar = tqdm(total=len(order), desc=desc or "scoring", unit="cand", disable=not self.progress, leave=False)
        while pending:
            done, _ = self.pool.ray.wait(list(pending), num_returns=1)
            for ref in done:
                out.update(self.pool.get(ref))
                bar.update(pending.pop(ref))
        bar.close()
        self.calls_seconds += time.perf_counter() - t0
        return out

    def _stats(self) -> list[dict]:
        return self.pool.get([a.stats.remote(self.name) for a in self.pool.actors])

    @property
    def evaluations(self) -> int:
        return sum(s["evaluations"] for s in self._stats())

    @property
    def seconds(self) -> float:
        return self.calls_seconds
