"""README.md (model card) of an exported folder: what it is, what was removed, how it was measured."""
from __future__ import annotations

from typing import Optional


def _removed_lines(summary: dict) -> list[str]:
    names = summary["removed_sublayers"]
    if not names:
        return ["Nothing: this is the dense model, re-exported."]
    by_layer: dict[int, list[str]] = {}
    for n in names:
        kind, i = n.split(".")
        by_layer.setdefault(int(i), []).append("attention" if kind == "attn" else "MLP")
    rows = ["| layer (original numbering) | removed |", "|---:|---|"]
    rows += [f"| {i} | {' + '.join(sorted(k))} |" for i, k in sorted(by_layer.items())]
    return [f"{len(names)} sublayers ({', '.join(names)}):", "", *rows]


def _load_lines(summary: dict) -> list[str]:
    remote = summary["layout"] == "native"
    trc = ", trust_remote_code=True" if remote else ""
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f"model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\"{trc})",
             f"tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\"{trc})", "```", ""]
    if not summary["vllm_servable"]:
        lines.append(f"vLLM: {summary['vllm']}.")
    else:
        flag = " --trust-remote-code" if remote else ""
        lines += ["```bash", f"python -m vllm.entrypoints.openai.api_server --model THIS_FOLDER{flag}", "```"]
    return lines


def model_card(summary: dict, plan: Optional[dict], source: Optional[str]) -> str:
    base = (plan or {}).get("model") or source or "unknown"
    layout = ("standard checkpoint of the original architecture with the removed layers gone and the rest "
              "renumbered; no remote code" if summary["layout"] == "standard" else
              "DeciLM / Nemotron-NAS (`model_type: nemotron-nas`): `config.json` has one `block_configs` "
              "entry per layer saying which sublayers exist; `modeling_rtk.py` beside the weights holds the "
              "config and model classes (`auto_map`)")
    lines = [
        "---", "library_name: transformers", "tags: [rtk, pruned]", "---", "",
        f"# {base}, pruned by rtk", "",
        f"- Base model: `{base}`" + (f" (`{plan['model_path']}`)" if plan and plan.get("model_path") else ""),
        f"- Format: `{summary['architecture']}`, {layout}.",
        f"- Weights: {summary['dtype']} safetensors, {summary['weight_bytes']:,} bytes.",
    ]
    before, after = summary.get("params_before"), summary["params"]
    if before:
        lines.append(f"- Parameters: {before:,} before -> {after:,} after "
                     f"({1 - after / before:.1%} removed; embeddings and LM head counted once)")
    else:
        lines.append(f"- Parameters: {after:,} (the model before pruning is not at hand: count before unknown)")
    lines += ["", "## Removed", "", *_removed_lines(summary), ""]
    if plan and all(k in plan.get("eval", {}) for k in ("ppl_base", "ppl_final")):
        ev, cal = plan["eval"], plan.get("calibration", {})
        lines += ["## Perplexity", "", "| text | before | after | measured on |", "|---|---:|---:|---|",
                  f"| evaluation | {ev['ppl_base']:.3f} | {ev['ppl_final']:.3f} | {ev.get('measured', '')} |"]
        if "ppl_base" in plan and "ppl_final" in plan and cal:
            lines.append(f"| calibration (search) | {plan['ppl_base']:.3f} | {plan['ppl_final']:.3f} | "
                         f"{cal.get('measured', '')} |")
        lines += ["", "Evaluation and calibration text are different splits; see `plan.json` and "
                      "`recipe.yaml` for every setting.", ""]
    else:
        lines += ["## Perplexity", "", "Not measured for this export (no plan.json with PPL from rtk prune).", ""]
    if plan and plan.get("heal"):
        from ..heal.record import card_lines

        lines += card_lines(plan)
    lines += ["## Verified on export", "",
              f"The folder was reloaded from disk and its logits compared ({summary['verification_inputs']}):", ""]
    lines += [f"- {v}" for v in summary["verification"]]
    lines += ["", "## Load", "", *_load_lines(summary), ""]
    return "\n".join(lines)
