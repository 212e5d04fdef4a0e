"""Image-text retrieval evaluation: during training (after epochs, on every rank) and `fne-eval` on a checkpoint.

Embedding is sharded: each rank embeds an equal slice of the images and of the captions, and the slices are
all-gathered, so every rank calls the model the same number of times (which ZeRO-3's parameter gathering
needs) and ends with the full embeddings; the metrics are then the same on every rank.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from fne_dist import checkpoint
from fne_dist.cli import ArgumentParser
from fne_dist.cli import run as run_cli
from fne_dist.config import ConfigError, load_config
from fne_dist.data.loader import load_eval_set
from fne_dist.distributed import all_gather_cat, rank, world_size
from fne_dist.model import build_towers
from fne_dist.protocols import PROTOCOLS, check_protocol, evaluate_protocol, format_table
from fne_dist.retrieval import retrieval_metrics

EVAL_BATCH = 256


@torch.no_grad()
def _embed_sharded(encode, inputs: torch.Tensor, device, dtype) -> torch.Tensor:
    """encode(batch) for this rank's slice of `inputs`, padded to an equal length, then gathered in order."""
    n = len(inputs)
    per_rank = math.ceil(n / world_size())
    rows = torch.arange(rank() * per_rank, (rank() + 1) * per_rank).clamp_max(n - 1)  # pad with the last row
    chunks = [encode(inputs[rows[i:i + EVAL_BATCH]].to(device, dtype)).float()
              for i in range(0, per_rank, EVAL_BATCH)]
    return all_gather_cat(torch.cat(chunks))[:n]


@torch.no_grad()
def embed(model, eval_set, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image [I, D] and caption [T, D] embeddings of an EvalSet (collective when distributed)."""
    was_training = model.training
    model.eval()
    images = _embed_sharded(lambda x: model(x, None)[0], eval_set.images, device, dtype)
    texts = _embed_sharded(lambda t: model(None, t)[1], eval_set.tokens, device, torch.long)
    model.train(was_training)
    return images, texts


def eval_groups(eval_set) -> torch.Tensor | None:
    """The images' groups for the group-aware recall: the shards' labels (a recipe's group id, a class), or None
    where any image has none (-1)."""
    return eval_set.labels if bool((eval_set.labels >= 0).all()) else None


def evaluate(model, eval_set, device, dtype=torch.float32) -> dict[str, float]:
    """R@1/5/10 both ways and rsum over the whole eval set, and the group-aware ones where it has labels."""
    images, texts = embed(model, eval_set, device, dtype)
    return retrieval_metrics(images, texts, eval_set.text_to_image, groups=eval_groups(eval_set))


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> int:
    """fne-eval --checkpoint DIR [--config FILE] [--protocol P] [--json OUT] [key=value ...]; bad input is one
    `fne-eval: error:` line and exit status 2."""
    return run_cli("fne-eval", _main, argv)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="fne-eval", description="Retrieval recall of a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True,
                        help="a tag folder, a checkpoints folder (its latest) or a run's output_dir")
    parser.add_argument("--config", help="YAML config to use instead of the one stored in the checkpoint")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="full")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.val=/data/test-{000..004}.tar")
    args = parser.parse_intermixed_args(argv)

    tag_dir = checkpoint.locate(args.checkpoint)
    state = checkpoint.read_state(tag_dir)
    cfg = load_config(args.config, args.overrides, base=None if args.config else state["config"])
    if cfg.data.val is None:
        raise ConfigError("the config names no evaluation shards: pass data.val=PATTERN")
    towers = build_towers(cfg.model)
    checkpoint.check_architecture(state, towers.architecture, tag_dir)  # as a resume does
    towers.model.load_state_dict(checkpoint.online_state_dict(tag_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    towers.model.float().to(device)
    eval_set = load_eval_set(cfg.data.val, preprocess=towers.preprocess_val, tokenizer=towers.tokenizer)
    check_protocol(args.protocol, len(eval_set.image_ids))
    images, texts = embed(towers.model, eval_set, device)
    metrics = evaluate_protocol(images, texts, eval_set.text_to_image, args.protocol, eval_groups(eval_set))
    print(f"{tag_dir} on {cfg.data.val} ({args.protocol}; {len(eval_set.image_ids)} images, "
          f"{len(eval_set.text_to_image)} captions, {eval_set.skipped} bad members skipped)")
    print(format_table({args.protocol: metrics}))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(tag_dir), "protocol": args.protocol,
                                               "metrics": metrics}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
