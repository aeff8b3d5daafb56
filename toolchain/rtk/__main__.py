"""`python -m rtk ...`: the rtk command, as torchrun starts it (`torchrun --nproc-per-node 8 -m rtk heal ...`)."""
from rtk.cli import run

run()
