"""fne-dist: False Negative Elimination for image-text matching, from one CPU to many GPUs."""

__version__ = "0.1.0"


def _say_loading() -> None:
    """fne-train, fne-eval and fne-export spend 5-15 s on a CPU importing torch and open_clip before their own code
    runs: say so at once (rank 0, stderr), so that a first run does not look hung."""
    import os
    import sys

    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))  # as distributed.rank_from_env, torch-free
    if prog in ("fne-train", "fne-eval", "fne-export") and rank == "0":
        print(f"{prog}: loading torch and open_clip ...", file=sys.stderr, flush=True)


_say_loading()
