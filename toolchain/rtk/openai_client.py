"""A small client for an OpenAI-compatible `/v1/completions` endpoint (vLLM), in token ids.

Token ids in, token ids and log-probs out: no text round trip, so comparisons with transformers are
exact about which token was scored. Every request has a timeout; connection errors, timeouts, 429 and
5xx answers are retried a bounded number of times with a short back-off; anything else is an error.
"""
from __future__ import annotations

import time
from typing import Sequence

import requests

from .errors import RtkError

TIMEOUT_S = 120.0
RETRIES = 3
BACKOFF_S = 1.0


def completions(url: str, payload: dict, timeout: float = TIMEOUT_S, retries: int = RETRIES) -> dict:
    """POST url/v1/completions and return the JSON answer."""
    endpoint = url.rstrip("/") + "/v1/completions"
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            r = requests.post(endpoint, json=payload, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            last = f"{type(exc).__name__}: {exc}"
            continue
        if r.status_code == 429 or r.status_code >= 500:
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            continue
        if r.status_code != 200:
            raise RtkError(f"{endpoint}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()
    raise RtkError(f"{endpoint}: no answer after {retries + 1} tries ({last})")


def prompt_logprobs(url: str, model: str, token_ids: Sequence[int], **kw) -> list[float]:
    """log p(token_ids[i] | token_ids[:i]) for i = 1..n-1, as the server computes them."""
    ids = [int(t) for t in token_ids]
    if len(ids) < 2:
        raise ValueError("prompt_logprobs needs at least 2 tokens")
    out = completions(url, {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                            "prompt_logprobs": 0}, **kw)
    per_pos = out["choices"][0].get("prompt_logprobs")
    if not per_pos or len(per_pos) != len(ids):
        raise RtkError(f"{url}: answer has no prompt_logprobs for {len(ids)} tokens")
    result = []
    for i, (tok, entry) in enumerate(zip(ids[1:], per_pos[1:]), 1):
        lp = (entry or {}).get(str(tok), (entry or {}).get(tok))
        if lp is None:
            raise RtkError(f"{url}: prompt_logprobs at position {i} lacks token {tok}")
        result.append(float(lp["logprob"] if isinstance(lp, dict) else lp))
    return result


def greedy(url: str, model: str, token_ids: Sequence[int], n: int, **kw) -> list[int]:
    """The next `n` token ids by greedy decoding (EOS does not stop it)."""
    out = completions(url, {"model": model, "prompt": [int(t) for t in token_ids], "max_tokens": int(n),
                            "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}, **kw)
    got = out["choices"][0].get("token_ids")
    if got is None or len(got) != n:
        raise RtkError(f"{url}: answer has {0 if got is None else len(got)} token ids, expected {n}")
    return [int(t) for t in got]
