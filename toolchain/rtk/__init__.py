"""rtk: remove whole attention / MLP sublayers by their measured impact on perplexity."""
__version__ = "0.1.0"
