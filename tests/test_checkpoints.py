"""The shipped checkpoints (docs/ckpt/*.pt): each loads strictly into today's model, built from its own config, and
reproduces the eval loss recorded when it was exported (`python train.py export`: rundir.export with train.py's
evaluate) -- a model change that breaks a shipped checkpoint fails here. The exporter never replaces a shipped file
unless told to."""
import glob
import os

import pytest
import torch

import rundir
import train
from cli import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "docs", "ckpt", "*.pt")))
BYTE_MODELS = ("blt-entropy", "blt", "megabyte", "megalodon")   # the papers' headline models
IMAGE_MODELS = ("mot", "moma", "mom", "transfusion")
# what each paper's demo prints only when it shows the trained model (beside "trained N steps")
DEMO_SHOWS = {"megabyte": ("greedy continuations",), "blt": ("mean patch length",), "megalodon": ("streamed",),
              "mot": ("caption -> image", "the scorer reads", "image -> caption"),
              "moma": ("layer 1", "image: patches of the object"),
              "mom": ("the scorer reads", "when every token runs the projections of"),
              "transfusion": ("the scorer reads",)}
TRAINER = (train.evaluate, train.TrainConfig, train.SETTING_DEFAULTS)   # what train.py hands the exporter


def test_the_headline_models_are_shipped_small():
    names = {os.path.basename(p)[:-3] for p in SHIPPED}
    want = set(BYTE_MODELS + IMAGE_MODELS)
    assert want <= names, f"missing docs/ckpt/{sorted(want - names)}.pt"
    assert sum(os.path.getsize(p) for p in SHIPPED) <= 25e6          # every shipped checkpoint together


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.basename(p))
def test_checkpoint_loads_strictly_and_reproduces_its_eval_loss(path):
    model, ds, ck = rundir.load_exported(path)                        # strict: no missing or unknown weight
    assert all(ck["model"][k].dtype == torch.float16 for k, _ in model.named_parameters())   # 16-bit weights
    ev = rundir.evaluate_exported(model, ds, ck, train.evaluate, train.TrainConfig, ck["check"]["eval_batches"])
    assert abs(ev["eval_loss"] - ck["check"]["eval_loss"]) < 1e-3, (os.path.basename(path), ev, ck["check"])
    assert ck["config"]["model"] == os.path.basename(path)[:-3]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny") / "run")
    assert train.main(["--model", "blt-entropy", "--setting", "bytes", "--steps", "2", "--seq_len", "64",
                       "--batch_size", "2", "--eval_every", "1", "--eval_batches", "2", "--gen_n", "0",
                       "--out", out]) == 0
    return out


def test_export_records_the_fp16_models_eval_and_never_overwrites(tiny_run, tmp_path, capsys):
    run, dst = tiny_run, str(tmp_path / "ckpt" / "tiny.pt")
    rundir.export(run, dst, *TRAINER)
    ck = rundir.read_export(dst)
    model, ds, _ = rundir.load_exported(dst)
    ev = rundir.evaluate_exported(model, ds, ck, train.evaluate, train.TrainConfig)
    assert ck["eval"]["eval_loss"] == ev["eval_loss"]
    assert ck["config"]["train"]["eval_batches"] == 2 and ck["run_eval"]["step"] == 2
    assert ck["command"] == (f"python train.py --model blt-entropy --setting bytes --steps 2 --batch_size 2 "
                             f"--seq_len 64 --eval_every 1 --eval_batches 2 --gen_n 0 --out {run}")
    before = open(dst, "rb").read()
    with pytest.raises(UsageError, match="--force"):
        rundir.export(run, dst, *TRAINER)
    assert train.main(["export", run, dst]) == 2 and "--force" in capsys.readouterr().err
    assert open(dst, "rb").read() == before                           # the shipped file is untouched
    assert train.main(["export", run, dst, "--force", "--window=32"]) == 0       # told to: replaced, config changed
    assert rundir.read_export(dst)["config"]["model_cfg"]["window"] == 32


def test_a_checkpoint_that_no_longer_fits_the_model_fails_to_load(tiny_run, tmp_path):
    dst = str(tmp_path / "tiny.pt")
    rundir.export(tiny_run, dst, *TRAINER)
    ck = torch.load(dst, map_location="cpu", weights_only=True)
    name = next(iter(ck["model"]))
    for change in ("drop", "extra"):
        bad = dict(ck, model=dict(ck["model"]))
        if change == "drop":
            del bad["model"][name]
        else:
            bad["model"]["blocks.9.weight"] = torch.zeros(2, dtype=torch.float16)
        torch.save(bad, dst)
        with pytest.raises(RuntimeError, match="Missing key" if change == "drop" else "Unexpected key"):
            rundir.load_exported(dst)


@pytest.mark.parametrize("paper", list(DEMO_SHOWS))
def test_the_papers_demo_runs_from_its_shipped_checkpoint(paper, capsys, monkeypatch):
    """`python PAPER.py` shows the trained model (a demo a model change broke would fall back or fail)."""
    import runpy
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, f"{paper}.py"), run_name="__main__")
    out = capsys.readouterr().out
    step = torch.load(os.path.join(ROOT, "docs", "ckpt", f"{paper}.pt"), map_location="cpu", weights_only=True)["step"]
    assert f"trained {step} steps" in out and "no trained checkpoint" not in out, out
    assert all(s in out for s in DEMO_SHOWS[paper]), out


@pytest.mark.parametrize("paper", IMAGE_MODELS)
def test_without_its_checkpoint_a_demo_says_so_in_one_line_then_runs_untrained(paper, capsys, monkeypatch):
    import runpy
    ckpt, isfile = os.path.join(ROOT, "docs", "ckpt", f"{paper}.pt"), os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: False if os.path.abspath(p) == ckpt else isfile(p))
    runpy.run_path(os.path.join(ROOT, f"{paper}.py"), run_name="__main__")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"no trained checkpoint at {ckpt}:") and len(out) > 2, out
    assert not any("no trained checkpoint" in line or " steps on the " in line for line in out[1:]), out


def test_the_trained_mechanism_figures_are_drawn_from_the_shipped_checkpoints(tmp_path, monkeypatch):
    """`python plots.py docs moma_routing_tokens` / `transfusion_samples` draw the shipped trained models (not a
    model built fresh), and redrawing gives the same file."""
    import plots
    used, shipped = [], plots._shipped
    monkeypatch.setattr(plots, "_shipped", lambda name: used.append(name) or shipped(name))
    for name, model in (("moma_routing_tokens", "moma"), ("transfusion_samples", "transfusion")):
        a, b = (plots.DOCS_FIGURES[name][0](str(tmp_path / f"{name}{k}.png")) for k in "ab")
        assert used[-2:] == [model, model]
        assert open(a, "rb").read() == open(b, "rb").read(), name
