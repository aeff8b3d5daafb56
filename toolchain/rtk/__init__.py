"""rtk: remove whole attention / MLP sublayers by their measured impact on perplexity."""
__version__ = "0.1.0"
# The name on PyPI: PyPI's `rtk` is an unrelated GPIO library. The import name and the command stay `rtk`.
DISTRIBUTION = "rtk-prune"


def pip_install(extra: str = "") -> str:
    """The line that installs rtk (with an extra), for every message and file that tells a user to."""
    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {DISTRIBUTION}"
