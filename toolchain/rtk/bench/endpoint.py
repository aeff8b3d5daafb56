"""Client of a served OpenAI-compatible `/v1/completions` endpoint (vLLM or another server), for what
rtk measures itself: PPL from prompt log-probs and greedy tokens. Accuracy and load are measured by the
standard tools (lm-eval's local-completions, vLLM's benchmark).

Prompts are sent as token-id lists, so every backend sees exactly the same tokens; the server's
echo of the prompt ids is compared with what was sent. Prompt log-probs come from vLLM's
`prompt_logprobs` extra parameter, or from `echo` + `logprobs` on servers without it.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import requests

from rtk.errors import RtkError

CONNECT_TIMEOUT = 5.0


def _post(url: str, payload: dict, timeout: float, session: Optional[requests.Session] = None,
          retries: int = 3, backoff: float = 1.0) -> dict:
    """POST /v1/completions; connection errors, timeouts, 429 and 5xx are retried (bounded, with back-off)."""
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            r = (session or requests).post(url.rstrip("/") + "/v1/completions", json=payload,
                                           timeout=(CONNECT_TIMEOUT, timeout))
        except requests.RequestException as exc:
            last = f"request failed ({type(exc).__name__})"
            continue
        if r.status_code == 429 or r.status_code >= 500:
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            continue
        if r.status_code != 200:
            raise RtkError(f"endpoint {url}: /v1/completions answered HTTP {r.status_code}: {r.text[:200]}")
        try:
            return r.json()
        except ValueError:
            raise RtkError(f"endpoint {url}: /v1/completions did not answer JSON") from None
    raise RtkError(f"endpoint {url}: /v1/completions: {last} after {retries + 1} tries")


def served_model(url: str, retries: int = 3, timeout: float = 5.0, backoff: float = 0.5) -> str:
    """The id of the (first) model a server serves; one clear error when nothing usable answers."""
    last = ""
    for attempt in range(retries):
        try:
            r = requests.get(url.rstrip("/") + "/v1/models", timeout=(CONNECT_TIMEOUT, timeout))
        except requests.RequestException as exc:
            last = f"no answer ({type(exc).__name__})"
        else:
            if r.status_code == 200:
                try:
                    return r.json()["data"][0]["id"]
                except (ValueError, KeyError, IndexError, TypeError):
                    raise RtkError(f"--endpoint {url}: /v1/models is not an OpenAI-compatible model list") from None
            if r.status_code in (404, 405):
                raise RtkError(f"--endpoint {url}: /v1/models answered HTTP {r.status_code}; "
                               "not an OpenAI-compatible server (give the base URL, without /v1)")
            last = f"HTTP {r.status_code}"
        if attempt + 1 < retries:
            time.sleep(backoff * (2 ** attempt))
    raise RtkError(f"--endpoint {url}: {last} after {retries} tries; is the server running?")


def prompt_logprobs(url: str, model: str, token_ids: Sequence[int], timeout: float = 300.0) -> list[float]:
    """log p(t_i | t_<i) for i >= 1 of a token-id prompt, as the server computes them."""
    ids = [int(t) for t in token_ids]
    data = _post(url, {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                       "prompt_logprobs": 0, "return_token_ids": True}, timeout)
    choice = data["choices"][0]
    plp = choice.get("prompt_logprobs")
    if plp is not None:
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and list(echoed) != ids:
            raise RtkError(f"endpoint {url}: the server changed the prompt tokens ({len(ids)} sent, "
                           f"{len(echoed)} used)")
        if len(plp) != len(ids):
            raise RtkError(f"endpoint {url}: {len(plp)} prompt log-probs for {len(ids)} prompt tokens")
        try:
            return [float(plp[i][str(ids[i])]["logprob"]) for i in range(1, len(ids))]
        except (KeyError, TypeError):
            raise RtkError(f"endpoint {url}: prompt_logprobs lack the prompt's own tokens") from None
    return _echo_logprobs(url, model, ids, timeout)


def _echo_logprobs(url: str, model: str, ids: list[int], timeout: float) -> list[float]:
    """Servers without `prompt_logprobs`: echo the prompt with its log-probs (OpenAI legacy)."""
    data = _post(url, {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "echo": True,
                       "logprobs": 1, "return_tokens_as_token_ids": True}, timeout)
    lp = data["choices"][0].get("logprobs") or {}
    toks, vals = lp.get("tokens") or [], lp.get("token_logprobs") or []
    if len(vals) < len(ids):
        raise RtkError(f"endpoint {url}: neither prompt_logprobs nor echo+logprobs returned the prompt's log-probs")
    got = [int(t.split(":", 1)[1]) if isinstance(t, str) and t.startswith("token_id:") else None
           for t in toks[: len(ids)]]
    if all(g is not None for g in got) and got != ids:
        raise RtkError(f"endpoint {url}: the server changed the prompt tokens")
    return [float(v) for v in vals[1: len(ids)]]


def greedy(url: str, model: str, token_ids: Sequence[int], n: int, timeout: float = 300.0) -> list[int]:
    """n greedily decoded token ids after a token-id prompt (EOS ignored)."""
    data = _post(url, {"model": model, "prompt": [int(t) for t in token_ids], "max_tokens": n,
                       "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}, timeout)
    out = data["choices"][0].get("token_ids")
    if out is None:
        raise RtkError(f"endpoint {url}: the server does not return generated token ids (return_token_ids)")
    return [int(t) for t in out]
