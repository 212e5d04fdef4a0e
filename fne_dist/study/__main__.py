"""`python -m fne_dist.study` (what `make study` runs)."""
from fne_dist.study.run import main

main()
