"""Lines more than one command prints."""
from __future__ import annotations

import click


def echo_healed(h: dict) -> None:
    ev = h["eval"]
    click.echo(f"rtk: healed ({h['method']}, {h['tokens']:,} tokens, {h['tokens_per_second']:.0f} tokens/s): "
               f"evaluation PPL {ev['ppl_before']:.3f} pruned -> {ev['ppl_after']:.3f} healed")
