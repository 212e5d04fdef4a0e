"""The momentum towers' EMA: the update itself (fp32 and bf16 online weights), under ZeRO-3 on partitions (two gloo
ranks, against a full-copy EMA of the gathered online weights), and once per optimizer step under gradient
accumulation (the trainer's own step)."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TINY
from fne_dist.momentum import momentum_copy, momentum_update


def test_momentum_update_is_the_ema(tiny_towers):
    online = tiny_towers.model
    momentum = momentum_copy(online)
    assert not any(p.requires_grad for p in momentum.parameters())
    for p in momentum.parameters():
        p.data.normal_()
    before = [p.clone() for p in momentum.parameters()]
    momentum_update(online, momentum, m=0.995)
    for new, old, theta in zip(momentum.parameters(), before, online.parameters()):
        assert torch.allclose(new, 0.995 * old + 0.005 * theta, atol=1e-7, rtol=1e-6)


def test_momentum_update_reads_bf16_online_weights_into_fp32_towers(tiny_towers):
    online = copy.deepcopy(tiny_towers.model).bfloat16()
    momentum = momentum_copy(tiny_towers.model)
    for p in momentum.parameters():
        p.data.normal_()
    before = [p.clone() for p in momentum.parameters()]
    momentum_update(online, momentum, m=0.995)
    for new, old, theta in zip(momentum.parameters(), before, online.parameters()):
        assert new.dtype == torch.float32
        assert torch.allclose(new, 0.995 * old + 0.005 * theta.float(), atol=1e-7, rtol=1e-6)


SHARDED_EMA = textwrap.dedent("""
    import contextlib, sys, torch, deepspeed
    import torch.distributed as dist
    from deepspeed.comm import comm as ds_comm
    from unittest import mock
    from fne_dist.config import ModelSection
    from fne_dist.model import build_towers, encode
    from fne_dist.momentum import (load_partition_state, momentum_copy, momentum_update, partition_state,
                                   shard_momentum)

    COLLECTIVES = ("all_gather_into_tensor", "all_gather", "all_gather_base", "all_gather_coalesced", "broadcast",
                   "all_reduce", "all_reduce_coalesced", "reduce_scatter_tensor")

    @contextlib.contextmanager
    def no_collectives():
        # any collective through torch.distributed or through DeepSpeed's comm backend raises AssertionError
        def collective(*args, **kwargs):
            raise AssertionError("a collective ran")
        with contextlib.ExitStack() as stack:
            for target in (dist, ds_comm.cdb):
                for name in COLLECTIVES:
                    if hasattr(target, name):
                        stack.enter_context(mock.patch.object(target, name, collective))
            yield

    dtype, tiny = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[1]], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    towers = build_towers(ModelSection(name=tiny))
    reference = momentum_copy(towers.model)  # the full-copy EMA, from the gathered online weights
    momentum = momentum_copy(towers.model)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": dtype == torch.bfloat16},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=towers.model, model_parameters=towers.model.parameters(), config=config)
    momentum = shard_momentum(momentum, config["zero_optimization"])
    # its gathers run on the stream that writes its partitions (see test_gpu_momentum_forward_waits_for_the_ema)
    assert not momentum.zero_overlap_comm() and engine.zero_overlap_comm()

    params = list(momentum.parameters())
    whole = sum(p.ds_numel for p in params)
    held = sum(p.ds_tensor.numel() for p in params)
    assert all(p.numel() == 0 for p in params), "the momentum towers should hold no gathered weights"
    assert all(p.ds_tensor.dtype == torch.float32 for p in params)
    assert whole <= world * held < whole + world * len(params), (whole, held)  # 1/world, plus padding
    print("SIZES", rank, whole, held, flush=True)

    torch.manual_seed(1 + rank)
    images = torch.randn(4, 3, 32, 32)
    tokens = towers.tokenizer([f"the digit {i}, rank {rank}" for i in range(4)])
    m = 0.9
    for step in range(4):
        with no_collectives():  # the EMA is local: each rank its own partitions
            momentum_update(engine.module, momentum, m, zero3=True)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            momentum_update(engine.module, reference, m)
        with torch.no_grad():
            keys, reference_keys = encode(momentum, images, tokens), encode(reference, images, tokens)
        for key, reference_key in zip(keys, reference_keys):
            torch.testing.assert_close(key, reference_key, rtol=1.3e-6, atol=1e-6)
        ia, ta, _ = engine(images.to(dtype), tokens)[:3]
        engine.backward(-(ia * ta).sum())
        engine.step()
    momentum_update(engine.module, momentum, m, zero3=True)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        momentum_update(engine.module, reference, m)
    with deepspeed.zero.GatheredParameters(params):
        moved = [not torch.equal(p, q) for p, q in zip(params, momentum_copy(towers.model).parameters())]
        for p, r in zip(params, reference.parameters()):
            torch.testing.assert_close(p, r, rtol=1.3e-6, atol=1e-7)
        bitwise = all(torch.equal(p, r) for p, r in zip(params, reference.parameters()))
    assert all(moved)
    print("BITWISE", rank, bitwise, flush=True)

    saved = partition_state(momentum)  # what a checkpoint holds of this rank
    assert [t.numel() for t in saved["partitions"]] == [p.ds_tensor.numel() for p in params]
    with torch.no_grad():
        for p in params:
            p.ds_tensor.add_(1.0)
    load_partition_state(momentum, saved, "rank file")
    assert all(torch.equal(p.ds_tensor, t) for p, t in zip(params, saved["partitions"]))
    try:
        load_partition_state(momentum, {**saved, "partitions": [t[:-1] for t in saved["partitions"]]}, "rank file")
        raise RuntimeError("partitions of another shape were loaded")
    except ValueError as err:
        assert "another world size" in str(err), err
    with no_collectives():  # it forbids what a full-copy EMA needs: DeepSpeed's gather of the whole model
        try:
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                pass
            raise RuntimeError("no_collectives let DeepSpeed's gather through")
        except AssertionError:
            pass
    print("SHARDED-EMA-OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero3_momentum_towers_are_sharded_and_equal_the_full_copy_ema(tmp_path, port, dtype):
    """Two gloo ranks under ZeRO-3: each holds ~1/2 of the fp32 momentum towers; over 5 EMAs (4 optimizer steps
    between them) the partitioned EMA equals a full-copy EMA of the gathered online weights to fp32 rounding
    (rtol 1.3e-6, atol 1e-7: the same lerp per element), without a collective, and so do the keys its
    layer-by-layer forward gives (atol 1e-6); a rank's partitions round-trip through `partition_state`, and
    partitions of another shape (another world size) are refused.  The momentum engine has overlap_comm off (the
    online one keeps stage 3's default), the wiring that the GPU test below checks in effect."""
    script = tmp_path / "sharded_ema.py"
    script.write_text(SHARDED_EMA)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script), dtype, TINY], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.count("SHARDED-EMA-OK") == 2, done.stdout[-3000:] + done.stderr[-3000:]


EMA_THEN_GATHER = textwrap.dedent("""
    import copy, os, sys, torch, deepspeed
    import torch.distributed as dist
    from fne_dist.config import ModelSection
    from fne_dist.model import build_towers, encode
    from fne_dist.momentum import momentum_copy, momentum_update, shard_momentum

    gpus, tiny = torch.cuda.device_count(), sys.argv[1]
    os.environ["LOCAL_RANK"] = str(int(os.environ["RANK"]) % gpus)  # with one GPU both ranks share it
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if gpus >= 2 else "gloo", verbose=False)
    torch.manual_seed(0)  # the same towers, noise and batch on every rank
    towers = build_towers(ModelSection(name=tiny))
    momentum = momentum_copy(towers.model)
    with torch.no_grad():
        for p in momentum.parameters():
            p.add_(torch.randn_like(p))  # far from the online towers: the EMA moves every weight a lot
    reference = copy.deepcopy(momentum).cuda()  # the same EMA on whole weights
    online = towers.model.cuda()
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=online, model_parameters=online.parameters(), config=config)
    momentum = shard_momentum(momentum.cuda(), config["zero_optimization"])
    images = torch.randn(4, 3, 32, 32).cuda()
    tokens = towers.tokenizer([f"the digit {i}" for i in range(4)]).cuda()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        momentum_update(engine.module, reference, 0.5)
    torch.cuda.synchronize()
    torch.cuda._sleep(2**31 - 1)  # ~1 s of work on the compute stream, ahead of the EMA's lerp
    momentum_update(engine.module, momentum, 0.5, zero3=True)
    with torch.no_grad():
        keys, want = encode(momentum, images, tokens), encode(reference, images, tokens)
    for key, reference_key in zip(keys, want):
        torch.testing.assert_close(key, reference_key, rtol=1e-4, atol=1e-4)
    print("EMA-BEFORE-GATHER-OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the race is between CUDA streams)")
def test_gpu_momentum_forward_waits_for_the_ema(tmp_path, port):
    """Two ZeRO-3 ranks (NCCL on two GPUs, or gloo sharing one): with the compute stream kept busy ahead of the
    EMA, the momentum forward that follows gives the keys of a whole-weight EMA (atol 1e-4), not those of the
    partitions before it.  DeepSpeed's gather copies the partitions out on the stream it gathers on; with stage 3's
    default `overlap_comm` that is its own stream, which does not wait for the EMA's lerp."""
    script = tmp_path / "ema_then_gather.py"
    script.write_text(EMA_THEN_GATHER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script), TINY], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.count("EMA-BEFORE-GATHER-OK") == 2, done.stdout[-3000:] + done.stderr[-3000:]


ACCUMULATION_CONFIG = """
model: {{name: {tiny}}}
data: {{train: unused, batch_size: 4}}   # the test brings its batches
fne: {{queue_size: 64, momentum: 0.5}}   # m = 0.5 against m^2 = 0.25: far apart
train: {{epochs: 1, output_dir: {out}}}
deepspeed:
  gradient_accumulation_steps: 2
  optimizer: {{type: AdamW, params: {{lr: 0.01, torch_adam: true}}}}
"""

ACCUMULATION = textwrap.dedent("""
    import sys, torch
    import fne_dist.train as T
    from fne_dist.config import load_config
    from fne_dist.data.loader import Batch

    K = 2  # micro-batches per optimizer step
    trainer = T.Trainer(load_config(sys.argv[1], sys.argv[2:]), T.init_distributed(), batches_per_epoch=100)
    m = trainer.cfg.fne.momentum
    snapshot = lambda module: [p.detach().clone() for p in module.parameters()]
    torch.manual_seed(0)
    reference, momentum, online = snapshot(trainer.momentum), [], []
    for step in range(2 * K + 1):
        ids = torch.arange(4) + 4 * step
        batch = Batch(torch.randn(4, 3, 32, 32), trainer.towers.tokenizer([f"digit {i}" for i in ids.tolist()]),
                      ids, torch.full((4,), -1))
        stepped = trainer.train_step(batch, step, warmup=False)
        momentum.append(snapshot(trainer.momentum))  # after this micro-batch's EMA, if one was due
        if stepped:
            online.append(snapshot(trainer.engine.module))
    assert len(online) == 2, "2K micro-batches should make 2 optimizer steps"
    # by hand: theta_m <- m theta_m + (1 - m) theta, once after each optimizer step (at the next micro-batch)
    references = [reference]
    for theta in online:
        references.append([m * r + (1 - m) * t for r, t in zip(references[-1], theta)])
    expected = [references[0]] * K + [references[1]] * K + [references[2]]
    for step, (got, want) in enumerate(zip(momentum, expected)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1.3e-6, atol=1e-7, msg=f"micro-batch {step}")
    per_micro_batch = references[0]  # an EMA at every micro-batch instead: effective momentum m^K per step
    for step in range(1, 2 * K + 1):
        theta = online[step // K - 1] if step >= K else references[0]
        per_micro_batch = [m * r + (1 - m) * t for r, t in zip(per_micro_batch, theta)]
    assert any(not torch.allclose(g, w) for g, w in zip(momentum[-1], per_micro_batch))
    print("EMA-ONCE-PER-OPTIMIZER-STEP-OK")
""")


def test_ema_runs_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    """deepspeed.gradient_accumulation_steps=2, 2 x 2 + 1 micro-batches through `Trainer.train_step` on one rank:
    the momentum towers move only at the micro-batch after each optimizer step, by exactly one EMA with momentum m
    towards the online weights of that step (a reference computed by hand, fp32 rounding: rtol 1.3e-6, atol 1e-7),
    not by m^2 (an EMA per micro-batch)."""
    config = ACCUMULATION_CONFIG.format(tiny=TINY, out=tmp_path / "run")
    assert "EMA-ONCE-PER-OPTIMIZER-STEP-OK" in run_trainer_script(tmp_path, ACCUMULATION, config)


def run_trainer_script(tmp_path, script: str, config: str) -> str:
    """Run `script` with `config` (YAML text) in a fresh one-rank process; its stdout, or a failure with both
    streams."""
    (tmp_path / "config.yaml").write_text(config)
    (tmp_path / "script.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "config.yaml")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


FROZEN_CONFIG = """
model: {{name: null, embed_dim: 32, image_tower: {{freeze: true, image_size: 64}}, text_tower: {{freeze: true}}}}
data: {{train: unused, batch_size: 4}}   # the test brings its batches
fne: {{queue_size: 64, momentum: 0.5}}
train: {{epochs: 1, output_dir: {out}}}
deepspeed:
  zero_optimization: {{stage: {stage}}}
  optimizer: {{type: AdamW, params: {{lr: 0.01, torch_adam: true}}}}
"""

FROZEN = textwrap.dedent("""
    import sys, torch
    import fne_dist.train as T
    from fne_dist.config import load_config
    from fne_dist.data.loader import Batch
    from fne_dist.model import encode

    trainer = T.Trainer(load_config(sys.argv[1]), T.init_distributed(), batches_per_epoch=100)
    assert trainer.trunk_tap is not None
    momentum = getattr(trainer.momentum, "module", trainer.momentum)
    calls = {"online": 0, "momentum": 0}
    for name, model in (("online", trainer.engine.module), ("momentum", momentum)):
        model.visual.trunk.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    torch.manual_seed(0)
    for step in range(3):
        ids = torch.arange(4) + 4 * step
        batch = Batch(torch.randn(4, 3, 64, 64), trainer.towers.tokenizer([f"a drawing of {i}" for i in ids.tolist()]),
                      ids, torch.full((4,), -1))
        calls.update(online=0, momentum=0)
        out = trainer.forward_loss(batch, step, warmup=False)
        assert calls == {"online": 1, "momentum": 0}, calls  # one trunk pass per step
        with torch.no_grad():
            ik, tk, _ = encode(trainer.momentum, batch.images, batch.tokens)  # what the momentum towers' own pass gives
        torch.testing.assert_close(out.keys.image, ik, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.keys.text, tk, rtol=0, atol=1e-6)
        calls.update(online=0, momentum=0)
        assert trainer.train_step(batch, step, warmup=False)  # the online heads move, the EMA follows
        assert calls == {"online": 1, "momentum": 0}, calls
    print("ONE-TRUNK-PASS-OK", flush=True)
""")


@pytest.mark.parametrize("stage", [1, 3])
def test_frozen_trunks_run_once_per_step(tmp_path, stage):
    """Pretrained towers with both trunks frozen (EfficientNet-Lite0 and MiniLM from the wheels, 64-pixel images):
    `Trainer.forward_loss` runs the trunks once, in the online towers, and the momentum keys it forms from their
    pooled outputs equal what the momentum towers' own full forward gives (atol 1e-6 on unit vectors: the same
    arithmetic), over three training steps whose EMA moves the heads; under ZeRO-1 and under ZeRO-3 (the momentum
    towers then sharded, their heads gathered by DeepSpeed's module hooks)."""
    config = FROZEN_CONFIG.format(out=tmp_path / "run", stage=stage)
    assert "ONE-TRUNK-PASS-OK" in run_trainer_script(tmp_path, FROZEN, config)
