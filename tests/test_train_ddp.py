"""DDP = one process, for every model family: 2 gloo ranks x 2 rows == 1 process x 2 micro-batches of 2 rows.

One torchrun invocation trains every family (this file is its script: `python -m torch.distributed.run
--nproc_per_node=2 tests/test_train_ddp.py OUT NAME...` starts the process group once and calls train.train for
each model); the 1-process runs are in the test's process. Same global batch, same rows in each forward pass (the
1-process micro-batch m holds the rows that rank m holds: data.py's row order), so the weights after a few steps
and the eval loss must agree to float rounding. Expert choice in MoMa is per forward batch, so it is equal here
because the forward batches are the same (moma.py documents and tests its dependence on the batch split)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

COMMON = {"steps": "3", "batch_size": "4", "eval_every": "3", "eval_batches": "1", "gen_n": "0", "warmup": "1",
          "lr": "1e-2", "log_every": "1", "ckpt_every": "3", "seq_len": "64"}
# one tiny config per family; every model file is covered (test_every_model_file_is_covered)
FAMILIES = {
    "dense": dict(d_model="32", n_layer="1", n_head="2"),
    "mot": dict(d_model="32", n_layer="1", n_head="2"),
    "moma": dict(d_model="32", n_layer="1", n_head="2"),
    "mamba": dict(d_model="32", n_layer="1"),
    "mom": dict(d_model="32", n_layer="1"),
    "transfusion": dict(d_model="32", n_layer="1", n_head="2"),
    "megabyte": dict(d_global="8", n_layer_global="1", d_local="32", n_layer_local="1", n_head_local="2"),
    "blt": dict(d_local="32", d_global="32", n_layer_global="1", n_layer_dec="1", entropy_ckpt="{ent}"),
    "megalodon": dict(d_model="32", n_layers="1", chunk_size="32"),
}
ENTROPY = dict(COMMON, setting="bytes", d_model="16", n_layer="1", steps="2", eval_every="2", ckpt_every="2")
KNOWN_UNEQUAL = {}  # name -> reason (owner): none; every family is DDP-equivalent
# training noise is drawn per micro-batch from a seed of its rows (train.noise_seed), never from the rank: with the
# same micro-batches, 2 ranks draw what 1 process draws, bit for bit (MODEL+label: MODEL with these values)
NOISY = {"moma+gumbel": dict(FAMILIES["moma"], gumbel="0.5"),
         "megabyte+dropout": dict(FAMILIES["megabyte"], dropout="0.1")}
RUNS = [*FAMILIES, *NOISY]


def overrides(name, ent, out):
    return {**COMMON, **{k: v.replace("{ent}", ent) for k, v in {**FAMILIES, **NOISY}[name].items()},
            "out": os.path.join(out, name)}


def test_every_model_file_is_covered():
    files = {mod.__name__ for (mod, *_rest) in train.registry().values()}
    covered = {train.registry()[n][0].__name__ for n in FAMILIES}
    assert files <= covered, f"add a tiny config for {sorted(files - covered)} to FAMILIES"


def _final(out):
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    ev = [r for r in train.read_jsonl(os.path.join(out, "metrics.jsonl")) if "eval_loss" in r][-1]
    tr = [r for r in train.read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    return ck["model"], ev, tr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    ent = str(base / "entropy")
    train.train("blt-entropy", dict(ENTROPY, out=ent), quiet=True)
    ent = os.path.join(ent, "ckpt.pt")
    one, two = str(base / "one"), str(base / "two")
    for name in RUNS:  # 1 process, 2 micro-batches of 2 rows
        train.train(name.split("+")[0], dict(overrides(name, ent, one), micro_batch_size="2"), quiet=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                        os.path.abspath(__file__), two, ent, *RUNS], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return one, two


def test_every_collective_takes_a_tensor_on_the_training_device(runs):
    # the torchrun run below recorded every collective the trainer called (nccl on a GPU has no CPU tensors and
    # gathers Python objects through the current device: the trainer sends its own tensors, on its device)
    for rank in range(2):
        calls = json.load(open(os.path.join(runs[1], f"collectives{rank}.json")))
        assert {c["op"] for c in calls} >= {"all_reduce", "all_gather"}, calls   # the stop flag; logs and evals
        wrong = [c for c in calls if c["op"] != "barrier" and c["device"] != c["training_device"]]
        assert not wrong, wrong[:5]
        assert not [c for c in calls if c["op"].endswith("_object")], "a Python-object collective"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_UNEQUAL[n]))
                                  if n in KNOWN_UNEQUAL else n for n in FAMILIES])
def test_two_ranks_equal_one_process(runs, name):
    (wa, eva, tra), (wb, evb, trb) = (_final(os.path.join(d, name)) for d in runs)
    assert wa.keys() == wb.keys()
    for k in wa:
        if wa[k].is_floating_point():
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        else:
            assert torch.equal(wa[k], wb[k]), f"{name}: {k}"
    assert abs(eva["eval_loss"] - evb["eval_loss"]) < 1e-4, (eva, evb)
    for a, b in zip(tra, trb):  # the logged train loss is the mean over ranks
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-4, (a, b)


@pytest.mark.parametrize("name", list(NOISY))
def test_training_noise_is_the_same_on_two_ranks(runs, name):
    (wa, eva, _), (wb, evb, _) = (_final(os.path.join(d, name)) for d in runs)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{name}: {k}"
    assert eva["eval_loss"] == evb["eval_loss"]
    quiet = _final(os.path.join(runs[0], name.split("+")[0]))[0]   # the same model without the noise: the noise is on
    assert any(not torch.equal(wa[k], quiet[k]) for k in wa if wa[k].is_floating_point()), name


def record_collectives(calls, training_device):
    """Wrap torch.distributed's collectives: each call's op and the device of the tensor(s) it is given."""
    dist = torch.distributed
    for op in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "broadcast", "reduce",
               "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "barrier"):
        def wrapped(*a, _op=op, _f=getattr(dist, op), **k):
            ts = [t for x in (*a, *k.values()) for t in (x if isinstance(x, (list, tuple)) else [x]) if isinstance(t, torch.Tensor)]
            calls.extend(dict(op=_op, device=None if t is None else str(t.device), training_device=training_device())
                         for t in ts or [None])
            return _f(*a, **k)
        setattr(dist, op, wrapped)


if __name__ == "__main__":  # under torchrun: one process group, every model in turn
    out, ent, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    calls, device = [], ["cpu"]
    real_resolve = train.cli.resolve_device
    train.cli.resolve_device = lambda dev, local: device.__setitem__(0, real_resolve(dev, local)) or device[0]
    record_collectives(calls, lambda: device[0])
    for name in names:
        train.train(name.split("+")[0], overrides(name, ent, out), quiet=True)
    with open(os.path.join(out, f"collectives{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(calls, f)
    torch.distributed.destroy_process_group()
