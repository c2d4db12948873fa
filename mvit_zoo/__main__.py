"""`python -m mvit_zoo COMMAND ...` (also under torchrun): the `mvit-zoo` command line."""
import sys

from .apps.cli import main

sys.exit(main())
