"""`python -m fne_dist.study` (what `make study` runs)."""
import sys

from fne_dist.study.run import main

sys.exit(main())
