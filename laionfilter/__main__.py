"""``python -m laionfilter``: the command line, e.g. under ``torchrun --nproc_per_node 8 -m laionfilter score ...``."""

from .cli import main

main()
