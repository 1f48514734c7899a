"""``python -m fastrnn_bench``: the ``fastrnn-bench`` command."""
import sys

from .cli import main

sys.exit(main())
