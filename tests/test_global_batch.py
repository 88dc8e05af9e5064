"""The batch a user asks for is the batch that trains: a step's gradient is the one of the mean loss over the whole
global batch, however the batch is cut into micro-batches (--micro_batch_size) or DDP ranks, for every model family.
(Training noise keyed by the rows, so that 2 ranks draw what 1 process draws: tests/test_train_ddp.py.)

The gradients are compared at the optimizer's step (train.train_step with an optimizer that keeps them): AdamW's first
steps divide each gradient by its own size, so weights a few steps on would amplify float rounding in near-zero
gradients, while a wrongly weighted micro-batch shows in the gradient itself. Expert-choice MoMa picks its tokens
over each forward batch (moma.py: a documented exception); moma-1t1i (every expert takes every token) is covered.
The 2-rank runs: one torchrun of this file (`python -m torch.distributed.run --nproc_per_node=2
tests/test_global_batch.py OUT ENTROPY_CKPT`) saves each rank's step (DDP's mean gradient) per family."""
import math
import os
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

BATCH = 4
TRAIN = dict(seq_len=64, batch_size=BATCH, grad_clip=math.inf)
FAMILIES = {   # one tiny config per family
    "dense": dict(d_model=32, n_layer=1, n_head=2),
    "mot": dict(d_model=32, n_layer=1, n_head=2),
    "moma-1t1i": dict(d_model=32, n_layer=1, n_head=2),
    "mamba": dict(d_model=32, n_layer=1),
    "mom": dict(d_model=32, n_layer=1),
    "transfusion": dict(d_model=32, n_layer=1, n_head=2),
    "transfusion-mot": dict(d_model=32, n_layer=1, n_head=2),
    "megabyte": dict(d_global=8, n_layer_global=1, d_local=32, n_layer_local=1, n_head_local=2),
    "blt": dict(d_local=32, d_global=32, n_layer_global=1, n_layer_dec=1, entropy_ckpt="{ent}"),
    "megalodon": dict(d_model=32, n_layers=1, chunk_size=32),
}


class KeepGrads:
    """The optimizer train_step steps: it keeps the gradients (by name) instead of updating."""
    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=True)


def step_grads(name, ent, micro, rank=0, world=1):
    """One train_step of `name` on the global batch (this rank's rows in micro-batches of `micro`) -> (logged loss,
    {parameter: gradient}); under torchrun (world 2) the model is DDP-wrapped and the gradients are the ranks' mean."""
    over = {k: v.replace("{ent}", ent) if isinstance(v, str) else v for k, v in FAMILIES[name].items()}
    model, cfg, tc, ds = train.build(name, overrides=over, train_overrides=TRAIN)
    cpu = [ds.get_batch("train", micro, i, rank, world) for i in range(BATCH // world // micro)]
    opt, wrapped = KeepGrads(model), model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    loss, _, _, ok = train.train_step(wrapped, cpu, opt, types.SimpleNamespace(step=lambda: None), tc,
                                      train.autocast_for("cpu"), world)
    assert ok
    return loss, opt.grads


@pytest.fixture(scope="module")
def ent(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("entropy"))
    train.train("blt-entropy", dict(setting="bytes", d_model="16", n_layer="1", steps="1", seq_len="64", batch_size="2",
                                    eval_every="1", eval_batches="1", gen_n="0", out=out), quiet=True)
    return os.path.join(out, "ckpt.pt")


def assert_same_step(a, b, what, tol=1e-6):
    (la, ga), (lb, gb) = a, b
    assert abs(la - lb) <= tol * abs(la), f"{what}: logged loss {la} != {lb}"
    assert ga.keys() == gb.keys(), what
    scale = max(float(g.abs().max()) for g in ga.values())
    for k in ga:
        err = float((ga[k] - gb[k]).abs().max())
        assert err <= tol * scale, f"{what}: {k} differs by {err:.3g} (largest gradient {scale:.3g})"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_micro_batches_train_as_the_global_batch(name, ent):
    full = step_grads(name, ent, BATCH)
    for micro in (1, 2):
        assert_same_step(full, step_grads(name, ent, micro), f"{name} --micro_batch_size {micro}")


@pytest.fixture(scope="module")
def two_ranks(ent, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ranks"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523",
                        os.path.abspath(__file__), out, ent], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(2)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_two_ranks_train_as_the_global_batch(name, ent, two_ranks):
    (l0, g0), (l1, g1) = two_ranks[0][name], two_ranks[1][name]
    for k in g0:                                      # DDP gave both ranks the same mean gradient
        assert torch.equal(g0[k], g1[k]), k
    assert_same_step(step_grads(name, ent, BATCH), ((l0 + l1) / 2, g0), f"{name} on 2 ranks")  # logged: rank mean


if __name__ == "__main__":  # under torchrun: every family's step on 2 ranks x BATCH / 2 rows; each rank saves its own
    out, ent_ckpt = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    steps = {name: step_grads(name, ent_ckpt, BATCH // 2, rank, 2) for name in FAMILIES}
    torch.save(steps, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()
