"""What a healing leaves behind for people: the loss curve, a report section, the model card's lines."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rtk.outdir import replace_atomic  # noqa: E402
from rtk.records.names import base_name  # noqa: E402

LOSS_CURVE = "loss_curve.png"


def settings_line(c: dict, steps: int) -> str:
    """How a healing trained, in words, from its HealConfig (as JSON) and its optimizer steps."""
    what = (f"LoRA r={c['lora']['rank']} alpha={c['lora']['alpha']:g} on {', '.join(c['lora']['targets'])} "
            "(merged)" if c["method"] == "lora" else
            "full fine-tuning" + ("" if c["train_embeddings"] else " (embeddings / LM head frozen)"))
    terms = [(c["kl_weight"], f"KL(T={c['temperature']:g})"), (c["ce_weight"], "CE on the text"),
             (c.get("hidden_weight") or 0.0, "layer states")]
    loss = " + ".join(f"{w:g} x {name}" for w, name in terms if w)
    mb, ga = c["micro_batch"], c["grad_accum"]
    batch = f"{mb * ga} blocks" + (f" ({ga} micro-batches of {mb})" if ga > 1 else "")
    return (f"{what}; loss {loss}; AdamW lr {c['lr']:g}, {c['warmup']:.0%} warm-up then cosine to "
            f"{c['min_lr']:g} x lr; {steps} steps of {batch}, seed {c['seed']}")


def _how(h: dict) -> str:
    return settings_line(h["config"], h["steps"])


def loss_curve(plan: dict, out: Path) -> str:
    """OUT/loss_curve.png: training loss per step against tokens, evaluation PPL on a second axis."""
    h = plan["heal"]
    steps = h["history"]["steps"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [s["tokens"] for s in steps]
    ax.plot(xs, [s["loss"] for s in steps], lw=0.8, alpha=0.5, label="loss (per step)")
    k = max(1, len(steps) // 20)
    smooth = [sum(s["loss"] for s in steps[max(0, i - k + 1): i + 1]) / len(steps[max(0, i - k + 1): i + 1])
              for i in range(len(steps))]
    ax.plot(xs, smooth, lw=1.6, label=f"loss ({k}-step mean)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ev = h["eval"]
    ax2 = ax.twinx()
    pts = [(0, ev["ppl_before"])] + [(e["tokens"], e["ppl"]) for e in h["history"]["evals"] if e["tokens"] > 0]
    pts.append((h["tokens"], ev["ppl_after"]))
    pts = sorted(dict(pts).items())
    ax2.plot([p[0] for p in pts], [p[1] for p in pts], color="C3", marker="o", ms=3,
             ls="-" if len(pts) > 2 else ":",  # before and after only: no curve to draw between them
             label=f"evaluation PPL ({ev.get('split') or ev.get('text')})")
    if "teacher" in h:
        ax2.axhline(h["teacher"]["ppl"], color="C2", ls="--", lw=1, label="teacher PPL")
    ax2.set_ylabel("evaluation PPL")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper right")
    ax.set_title(f"healing: {h['method']}, {h['tokens']:,} tokens of {h['data']['text']}", fontsize=8)
    fig.tight_layout()
    replace_atomic(out / LOSS_CURVE, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return LOSS_CURVE


def report_lines(plan: dict, out: Path) -> list[str]:
    """The "Healing" section of report.md (writes the loss curve)."""
    h = plan["heal"]
    ev = h["eval"]
    curve = loss_curve(plan, out)
    text = (f"- Text: {h['data']['text']}, {h['blocks']} blocks x {h['data']['seq_len']} tokens, {h['tokens']:,} "
            f"training tokens ({h['passes']:.2f} passes over them)." if h.get("passes") is not None else
            f"- Text: {h['data']['text']}, read in blocks of {h['data']['seq_len']} tokens, {h['tokens']:,} training "
            f"tokens.")
    procs = h.get("processes")
    lines = ["## Healing (knowledge distillation from the original)", "", text,
             f"- How: {_how(h)}; {h['trainable_params']:,} trainable parameters; {h['dtype']} on {h['device']}"
             + (f" x {procs} processes (torchrun, FSDP2)" if procs else "")
             + f"{', gradient checkpointing' if h['gradient_checkpointing'] else ''}.",
             f"- Loss {h['loss_first']:.4f} (first step) -> {h['loss_last']:.4f} (mean of the last tenth); "
             f"{h['tokens_per_second']:.0f} training tokens/s over {h['train_seconds']:.0f} s "
             f"({h['threads']} thread{'s' * (h['threads'] != 1)}" + (" per process" if procs else "") + ").", "",
             "| evaluation PPL | teacher | pruned | healed | measured on |", "|---|---:|---:|---:|---|",
             f"| {ev.get('split') or ''} | {h.get('teacher', {}).get('ppl', float('nan')):.3f} | "
             f"{ev['ppl_before']:.3f} | {ev['ppl_after']:.3f} | {ev['measured']} |", ""]
    if h["data"].get("text", "").split(" ")[0] == (ev.get("text") or "").split(" ")[0]:
        lines += ["The training text and the evaluation text come from the same corpus (different splits): "
                  "the evaluation PPL flatters healing; zero-shot accuracy is the fairer check.", ""]
    lines += [f"![loss curve]({curve})", ""]
    return lines


def card_lines(plan: dict) -> list[str]:
    """The model card's "Healing" section (the teacher named as the card names the base model)."""

    h = plan["heal"]
    ev = h["eval"]
    return ["## Healing", "",
            f"After pruning, the model was distilled from {base_name(h.get('teacher', {}).get('model', plan.get('model')))} "
            f"on {h['tokens']:,} tokens of {h['data']['text']}: {_how(h)}. Loss {h['loss_first']:.4f} -> "
            f"{h['loss_last']:.4f}. Evaluation PPL {ev['ppl_before']:.3f} before -> {ev['ppl_after']:.3f} after "
            f"healing ({ev['measured']}). Same shapes as the pruned model.", ""]


def write_heal_report(plan: dict, out: Path) -> None:
    """OUT/report.md of `rtk heal`."""
    out = Path(out)
    h = plan["heal"]
    head = [f"# rtk heal report: {plan.get('model')}", "",
            f"- Student: `{plan.get('healed_from')}` ({plan['params_after']:,} parameters"
            + (f", {1 - plan['params_after'] / plan['params_total']:.1%} fewer than the teacher"
               if plan.get("params_total") else "") + ")",
            f"- Teacher: `{h['teacher']['model']}`", f"- Whole run: {plan['heal_wall_seconds']:.0f} s", ""]
    replace_atomic(out / "report.md", lambda p: p.write_text("\n".join(head + report_lines(plan, out))))
