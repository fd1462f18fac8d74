"""gdpo training entry point (the same as the installed ``gdpo-train`` script; see gdpo/cli.py).

    python train.py --config configs/tiny_gdpo.yaml [key=value ...]
    deepspeed train.py --config configs/math_gdpo.yaml
    python train.py --config configs/math_gdpo.yaml --dry-run   # no GPU, no weights: plan + first prompt
"""

import sys

from gdpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
