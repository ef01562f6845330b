"""`python -m sageserve ...`: the `sageserve` command."""

import sys

from sageserve.cli import main

sys.exit(main())
