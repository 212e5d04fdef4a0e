"""fne-export: a training checkpoint -> open_clip weights that plain open_clip loads, without fne-dist.

The online towers are what FNE trains and what `fne-eval` measures, so they are what is exported: the same
weights (`checkpoint.online_state_dict`, in fp32) that the evaluation loads, giving the same embeddings.  The
1-element logit scale the trainer uses for DeepSpeed is stored in open_clip's usual 0-dim shape.

Two layouts, chosen by --out:
  model.pt   the state dict, and model.json beside it (the open_clip model config):
               open_clip.add_model_config("model.json")
               model, _, preprocess = open_clip.create_model_and_transforms("model", pretrained="model.pt")
  DIR        (no .pt/.pth/.bin suffix) open_clip's local-dir layout, open_clip_config.json +
             open_clip_pytorch_model.bin:  open_clip.create_model_and_transforms("local-dir:DIR")
Both are checked before the command returns: open_clip builds the model from what was written and loads the
weights strictly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin")
LOCAL_DIR_CONFIG = "open_clip_config.json"
LOCAL_DIR_WEIGHTS = "open_clip_pytorch_model.bin"


def exported_state_dict(tag_dir: str | Path) -> tuple[dict, dict]:
    """(open_clip state dict in fp32, open_clip model config) of a checkpoint's online towers."""
    from fne_dist.checkpoint import online_state_dict, read_state

    return exportable(online_state_dict(tag_dir)), read_state(tag_dir)["architecture"]


def exportable(state: dict) -> dict:
    """The towers' state as plain open_clip loads it: fp32, and the trainer's 1-element logit scale (and bias) in
    open_clip's 0-dim shape."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    for key in ("logit_scale", "logit_bias"):
        if key in state:
            state[key] = state[key].reshape(())
    return state


def _atomic_save(obj, path: Path, as_json: bool = False) -> None:
    tmp = path.with_name(path.name + ".partial")
    if as_json:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def export(checkpoint: str, out: str | Path) -> dict[str, str]:
    """Write the export of `checkpoint` (a tag folder, a checkpoints folder or a run's output_dir) to `out`.

    Returns how to load it: {"weights", "config", "model_name"} where model_name is what
    open_clip.create_model_and_transforms takes (after add_model_config(config) for the file layout).
    """
    import open_clip

    from fne_dist.checkpoint import find

    tag_dir = find(checkpoint, checkpoint)
    state, architecture = exported_state_dict(tag_dir)
    out = Path(out)
    if out.suffix in WEIGHT_SUFFIXES:
        weights, config = out, out.with_suffix(".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(architecture, config, as_json=True)
        _atomic_save(state, weights)
        open_clip.add_model_config(config)
        model_name, pretrained = config.stem, str(weights)
    else:
        weights, config = out / LOCAL_DIR_WEIGHTS, out / LOCAL_DIR_CONFIG
        out.mkdir(parents=True, exist_ok=True)
        _atomic_save({"model_cfg": architecture}, config, as_json=True)
        _atomic_save(state, weights)
        model_name, pretrained = f"local-dir:{out}", None
    open_clip.create_model(model_name, pretrained=pretrained)  # builds and loads strictly, or raises
    return {"weights": str(weights), "config": str(config), "model_name": model_name, "checkpoint": str(tag_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fne-export", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint tag folder, a checkpoints folder (its latest) or a run's output_dir")
    parser.add_argument("--out", required=True, help="model.pt (+ model.json beside it) or a folder (local-dir)")
    args = parser.parse_args(argv)
    try:
        written = export(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as exn:
        print(f"fne-export: error: {exn}", file=sys.stderr)
        return 2
    print(f"exported the online towers of {written['checkpoint']}:\n  weights {written['weights']}\n"
          f"  config  {written['config']}")
    if written["model_name"].startswith("local-dir:"):
        print(f"load: open_clip.create_model_and_transforms({written['model_name']!r})")
    else:
        print(f"load: open_clip.add_model_config({written['config']!r}); "
              f"open_clip.create_model_and_transforms({written['model_name']!r}, pretrained={written['weights']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
