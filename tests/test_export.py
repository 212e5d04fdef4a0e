"""fne-export and DeepSpeed's zero_to_fp32 on real checkpoints of two short training runs (ZeRO-1 and ZeRO-3)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from fne_dist import checkpoint
from fne_dist.config import load_config
from fne_dist.data.loader import load_eval_set
from fne_dist.data.digits import build_demo_shards
from fne_dist.evaluate import embed
from fne_dist.export import exported_state_dict, main
from fne_dist.model import build_towers

ROOT = Path(__file__).resolve().parents[1]
STAGES = (1, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """Two 1-step demo trainings, one per ZeRO stage, run side by side; {stage: output_dir}."""
    root = tmp_path_factory.mktemp("export")
    shards = root / "shards"
    build_demo_shards(shards)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    procs = {}
    for stage in STAGES:
        procs[stage] = subprocess.Popen(
            [sys.executable, "-m", "fne_dist.train", "--config", str(ROOT / "configs" / "demo.yaml"),
             f"model.name={ROOT / 'configs' / 'models' / 'tiny-vit.json'}",
             f"data.train={shards}/train-{{000000..000007}}.tar", f"data.val={shards}/test-000001.tar",
             f"train.output_dir={root / f'zero{stage}'}", "train.steps=1", "train.eval_every=0",
             "data.batch_size=8", "fne.queue_size=64", f"deepspeed.zero_optimization.stage={stage}"],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for stage, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"ZeRO-{stage} training failed:\n{out[-3000:]}"
    return {stage: root / f"zero{stage}" for stage in STAGES}


@pytest.mark.parametrize("stage", STAGES)
def test_export_loads_in_open_clip_with_the_evaluation_embeddings(runs, stage, tmp_path):
    out = tmp_path / "fne_model.pt"
    assert main(["--checkpoint", str(runs[stage]), "--out", str(out)]) == 0
    assert out.with_suffix(".json").is_file()

    tag_dir = checkpoint.find(str(runs[stage]), str(runs[stage]))
    cfg = load_config(None, [], base=checkpoint.read_state(tag_dir)["config"])
    ours = build_towers(cfg.model)  # what fne-eval does
    ours.model.load_state_dict(checkpoint.online_state_dict(tag_dir))
    eval_set = load_eval_set(cfg.data.val, preprocess=ours.preprocess_val, tokenizer=ours.tokenizer)
    want_images, want_texts = embed(ours.model.float(), eval_set, torch.device("cpu"))

    open_clip.add_model_config(out.with_suffix(".json"))  # what a user of the export does
    model, _, preprocess = open_clip.create_model_and_transforms("fne_model", pretrained=str(out))
    tokenizer = open_clip.get_tokenizer("fne_model")
    theirs = load_eval_set(cfg.data.val, preprocess=preprocess, tokenizer=tokenizer)
    assert torch.equal(theirs.images, eval_set.images) and torch.equal(theirs.tokens, eval_set.tokens)
    model.eval()
    with torch.no_grad():
        images = model.encode_image(theirs.images, normalize=True)
        texts = model.encode_text(theirs.tokens, normalize=True)
    torch.testing.assert_close(images, want_images, rtol=0, atol=1e-6)
    torch.testing.assert_close(texts, want_texts, rtol=0, atol=1e-6)


def test_local_dir_layout(runs, tmp_path):
    assert main(["--checkpoint", str(runs[1] / "checkpoints"), "--out", str(tmp_path / "clip")]) == 0
    model = open_clip.create_model(f"local-dir:{tmp_path / 'clip'}")
    tag_dir = checkpoint.find(str(runs[1]), str(runs[1]))
    state, _ = exported_state_dict(tag_dir)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert open_clip.get_tokenizer(f"local-dir:{tmp_path / 'clip'}").context_length == 16


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_zero_to_fp32_reads_our_checkpoints(runs, stage):
    """DeepSpeed's tool rebuilds the trained weights from the fp32 optimizer partitions.  Below ZeRO-2 DeepSpeed
    does not store frozen parameters for it, so its output lacks the (frozen) logit scale there: fne-export,
    which reads the module itself at those stages, is the complete way out."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir = runs[stage] / "checkpoints"
    assert (ckpt_dir / "zero_to_fp32.py").is_file()  # the copy DeepSpeed leaves for offline conversion
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir))  # finds the tag through our `latest`
    state, _ = exported_state_dict(checkpoint.find(str(ckpt_dir), str(ckpt_dir)))
    assert state.keys() - fp32.keys() == (set() if stage >= 2 else {"logit_scale"})
    for key, value in fp32.items():
        assert torch.equal(value.reshape(state[key].shape), state[key]), key


def test_export_of_a_non_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "m.pt")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
