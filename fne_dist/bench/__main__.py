"""`python -m fne_dist.bench ...`, the same as `fne-bench ...`."""
from fne_dist.bench.cli import main

main()
