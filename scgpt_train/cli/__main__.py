"""`torchrun -m scgpt_train.cli ...`: the scgpt-train commands in each process."""

from . import main

main()
