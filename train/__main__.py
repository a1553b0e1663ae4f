"""`python -m plait.train ...` and `torchrun -m plait.train ...` run `plait-train`."""

from plait.train.cli import main

main()
