"""`rtk quantize MODEL_DIR --scheme S -o OUT`: parse -> rtk.quantize.api.quantize -> echo."""
from __future__ import annotations

from pathlib import Path

import click

from rtk.quantize import SCHEMES, VERIFY_SAMPLES, VERIFY_SEQ_LEN  # a table of names: imports nothing heavy


@click.command("quantize")
@click.argument("model_dir")
@click.option("--scheme", required=True, help=f"How to quantize: {', '.join(SCHEMES)} (ort-int8: ONNX Runtime's "
              "dynamic int8 of an `rtk export --format onnx` folder; the others are not built yet).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--text", default=None, help="The text the quantized and unquantized models are compared on: "
              "wikitext2 (its test split, the default) or a .txt / .jsonl file.")
@click.option("--ppl-samples", type=click.IntRange(min=1), default=VERIFY_SAMPLES, show_default=True,
              help="Blocks of the text compared.")
@click.option("--ppl-seq-len", type=click.IntRange(min=2), default=VERIFY_SEQ_LEN, show_default=True,
              help="Tokens per block.")
def quantize(model_dir: str, scheme: str, out: Path, text: str | None, ppl_samples: int, ppl_seq_len: int):
    """Quantize MODEL_DIR with the ecosystem's own tool and check it: the quantized model is reloaded and compared
    with MODEL_DIR on the same token ids (per-token log-probs, PPL) and moved to -o OUT only within the tolerance
    (README: Quantize). OUT keeps MODEL_DIR's tokenizer, configs and card, plus quantize.json."""
    from rtk.quantize import UnknownScheme
    from rtk.quantize.api import quantize as run

    try:
        res = run(model_dir, scheme, out=out, text=text, samples=ppl_samples, seq_len=ppl_seq_len, echo=click.echo)
    except UnknownScheme as exc:
        raise click.BadParameter(exc.message, param_hint="'--scheme'") from None
    v = res.record["verification"]
    click.echo(f"rtk: wrote {out} ({scheme}: {res.record['quantized_matmuls']} of {res.record['weight_matmuls']} "
               f"weight MatMuls int8)")
    click.echo(f"rtk: verified: PPL {res.ppl_unquantized:.4f} -> {res.ppl_quantized:.4f} ({v['ppl_increase']:+.2%}; "
               f"tolerance +{v['tolerance']['max_ppl_increase']:.0%}); mean |log-prob difference| "
               f"{res.mean_abs_logprob_diff:.4f} nats per token, decoding {v['decode']['mean_abs_logprob_diff']:.4f} "
               f"(tolerance {v['tolerance']['max_mean_abs_logprob_diff']:g})")
