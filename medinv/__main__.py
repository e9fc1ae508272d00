"""``python -m medinv``: the ``medinv`` command (for example under torchrun)."""

from medinv.cli import main

main()
