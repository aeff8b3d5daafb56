"""rtk command line: one module per command, each parse -> config -> stage -> echo; errors are one line and
exit != 0."""
from __future__ import annotations

import os

import click

from rtk import __version__
from rtk.cli.ablate import ablate
from rtk.cli.bench import bench
from rtk.cli.deploy import deploy
from rtk.cli.export import export
from rtk.cli.heal import heal
from rtk.cli.profile import profile
from rtk.cli.prune import prune
from rtk.cli.quantize import quantize
from rtk.errors import RtkError


@click.group()
@click.version_option(__version__, prog_name="rtk")
def main():
    """rtk: remove whole attention / MLP sublayers by their measured impact on perplexity,
    and ship the smaller model to vLLM and ONNX Runtime."""


for _command in (prune, heal, export, quantize, deploy, bench, ablate, profile):
    main.add_command(_command)


def _terminated(signum, frame):
    """SIGTERM unwinds the stack (finally blocks stop the servers rtk started; partial work stays resumable)."""
    click.echo("rtk: terminated", err=True)
    raise SystemExit(143)


def run():
    """Entry point: a user error prints one line; Ctrl-C (130) and SIGTERM (143) exit without a traceback."""
    import signal

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("rtk: interrupted", err=True)
        raise SystemExit(130)


__all__ = ["main", "run", "RtkError"]
