"""`python -m megatron_po.train` (under torchrun): one training stage."""

import sys

from megatron_po.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
