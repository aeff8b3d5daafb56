"""`rtk bench`: original vs pruned models: perplexity, zero-shot accuracy and speed."""
