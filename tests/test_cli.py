"""Every console script: bad input is one `prog: error:` line (rank 0 only under a launcher) and exit status 2."""
import pytest
import torch

from conftest import ROOT
from fne_dist import checkpoint
from fne_dist.bench import cli as bench
from fne_dist import evaluate as fne_eval
from fne_dist import train as fne_train
from fne_dist.config import load_config, to_dict
from fne_dist.model import build_towers

DEMO = str(ROOT / "configs" / "demo.yaml")


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_fne_train_bad_key_is_one_error_line(capsys, tmp_path):
    assert fne_train.main(["--config", DEMO, f"train.output_dir={tmp_path}", "train.stepz=3"]) == 2
    assert error_lines(capsys) == ["fne-train: error: unknown config key 'train.stepz' in the command-line "
                                   "overrides: did you mean 'train.steps'?"]


def test_only_rank_0_says_it(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert fne_train.main(["--config", DEMO, "train.stepz=3"]) == 2
    with pytest.raises(SystemExit) as exit_:
        fne_train.main(["--confg", DEMO])
    assert exit_.value.code == 2 and error_lines(capsys) == []


def test_resume_may_follow_the_overrides():
    args = fne_train.parse_args(["--config", DEMO, "train.steps=3", "--resume", "latest", "fne.mode=bayes"])
    assert args.resume == "latest" and args.overrides == ["train.steps=3", "fne.mode=bayes"]


def test_fne_train_refuses_a_folder_with_checkpoints_before_building_anything(capsys, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step000000010")
    assert fne_train.main(["--config", DEMO, f"train.output_dir={tmp_path}"]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"fne-train: error: train.output_dir={tmp_path} holds the checkpoints of an earlier run")


def fake_checkpoint(tmp_path, architecture):
    """A tag folder whose fne_state.pt holds the demo config and `architecture`."""
    tag = tmp_path / "checkpoints" / checkpoint.tag_name(10)
    tag.mkdir(parents=True)
    torch.save({"config": to_dict(load_config(DEMO)), "architecture": architecture, "world_size": 1},
               tag / checkpoint.STATE)
    (tmp_path / "checkpoints" / "latest").write_text(tag.name)
    return tag


def test_fne_eval_names_a_missing_or_damaged_checkpoint(capsys, tmp_path):
    assert fne_eval.main(["--checkpoint", str(tmp_path / "nothing")]) == 2
    [line] = error_lines(capsys)
    assert line.startswith("fne-eval: error: ") and "nothing is not a checkpoint" in line
    tag = fake_checkpoint(tmp_path, build_towers(load_config(DEMO).model).architecture)
    (tag / checkpoint.DS_MODEL_STATES).write_bytes(b"")
    assert fne_eval.main(["--checkpoint", str(tmp_path), "data.val=x.tar"]) == 2
    [line] = error_lines(capsys)
    assert f"{tag / checkpoint.DS_MODEL_STATES} is empty, truncated or corrupt" in line


def test_fne_eval_refuses_another_architecture(capsys, tmp_path):
    architecture = build_towers(load_config(DEMO).model).architecture
    fake_checkpoint(tmp_path, {**architecture, "embed_dim": 2 * architecture["embed_dim"]})
    assert fne_eval.main(["--checkpoint", str(tmp_path), "data.val=x.tar"]) == 2
    [line] = error_lines(capsys)
    assert "do not fit this model config: model architecture embed_dim" in line


def test_fne_bench_help_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0 and "sampler" in capsys.readouterr().out
    for argv in ([], ["bogus"], ["step", "--impl", "bogus"]):
        with pytest.raises(SystemExit) as exit_:
            bench.main(argv)
        assert exit_.value.code == 2
    assert "argument --impl: invalid choice: 'bogus'" in capsys.readouterr().err
