"""plots.py: every figure is written from tiny synthetic runs and tiny models, at most 1600 px wide; the FLOPs
fractions it reports are right; model_figures never raises."""
import json
import math
import os
import struct

import pytest
import torch

import data
import plots


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def fake_run(d, model, setting, scale, steps=100, keys=("text", "image")):
    """A run whose eval losses fall as 1 + 1 / (scale * step): scale 2 reaches any value in half the FLOPs."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(dict(model=model, setting=setting, train=dict(steps=steps, seed=0))))
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(10, steps + 1, 10):
            f.write(json.dumps(dict(step=s, tokens=s * 100, flops=s * 1e9, loss=2 + 1 / s,
                                    **{f"loss_{k}": 2 + 1 / s for k in keys})) + "\n")
            ev = dict(step=s, tokens=s * 100, flops=s * 1e9, eval_loss=1 + 1 / (scale * s),
                      **{f"eval_loss_{k}": 1 + 1 / (scale * s) for k in keys})
            ev.update(gen_image_acc=0.5, gen_image_chance=0.25)
            f.write(json.dumps(ev) + "\n")


def test_plot_run_and_compare(tmp_path):
    fake_run(tmp_path / "dense", "dense", "chameleon", 1.0)
    fake_run(tmp_path / "mot", "mot", "chameleon", 2.0)
    p = plots.plot_run(str(tmp_path / "mot"))
    assert png_size(p)[0] <= 1600
    res = plots.plot_compare(str(tmp_path), ["dense", "mot"])
    assert png_size(tmp_path / "compare.png")[0] <= 1600
    # mot's curve is dense's at half the FLOPs: it reaches dense's final loss at 50% (linear interpolation)
    assert res["mot"]["eval_loss_image"] == pytest.approx(0.5, abs=1e-9)
    assert res["dense"]["eval_loss_image"] == pytest.approx(1.0)
    res = plots.plot_compare(str(tmp_path), ["dense", "mot"], path=str(tmp_path / "acc.png"),
                             keys=["eval_loss_image", "gen_image_acc"], labels={"mot": "Mixture-of-Transformers"})
    assert (tmp_path / "acc.png").exists()


def test_compare_titles_say_setting_and_steps(tmp_path, monkeypatch):
    fake_run(tmp_path / "dense", "dense", "speech", 1.0, steps=300)
    fake_run(tmp_path / "mot", "mot", "speech", 1.5, steps=300)
    titles = []
    import matplotlib.figure
    orig = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: titles.append(t) or orig(self, t, **kw))
    plots.plot_compare(str(tmp_path), ["dense", "mot"])
    assert "speech setting" in titles[0] and "300 steps" in titles[0] and "MoT" in titles[0]


def test_flops_to_reach_interpolates():
    ev = [dict(flops=1.0, l=3.0), dict(flops=2.0, l=2.0), dict(flops=3.0, l=1.0)]
    assert plots.flops_to_reach(ev, "l", 1.5) == pytest.approx(2.5)
    assert plots.flops_to_reach(ev, "l", 0.5) is None


def test_toy_world(tmp_path):
    p = plots.toy_world(str(tmp_path / "toy.png"), n_scenes=4)
    w, h = png_size(p)
    assert w <= 1600 and h > 100


def tiny(name, setting, **over):
    mod = next(m for m in map(__import__, ("mot", "mom", "moma", "transfusion", "megabyte", "blt", "megalodon"))
               if name in getattr(m, "MODELS", {}))
    C, M, _, base = mod.MODELS[name]
    ds = data.make_data(setting, seq_len=128)
    fields = C.__dataclass_fields__
    kw = {**base, **{k: v for k, v in ds.model_fields().items() if k in fields}, **over}
    torch.manual_seed(0)
    return M(C(**{k: v for k, v in kw.items() if k in fields})), ds


@pytest.mark.parametrize("name,setting,over,expect", [
    ("mot", "chameleon", {}, "mot_weights.png"),
    ("mamba", "chameleon", {}, "mom_projections.png"),        # every projection shared: all grey
    ("mom", "chameleon", {}, "mom_projections.png"),
    ("moma", "chameleon", {}, "moma_routing_tokens.png"),
    ("transfusion", "transfusion", {}, "transfusion_mask.png"),
    ("megabyte", "bytes", {}, "megabyte_layout.png"),
    ("blt", "bytes", dict(patching="space"), "blt_patches.png"),
    ("megalodon", "bytes", dict(chunk_size=32), "megalodon_cema.png"),
])
def test_model_figures_write_the_mechanism(tmp_path, name, setting, over, expect, capsys):
    model, ds = tiny(name, setting, **over)
    if name == "moma":                                       # an eval forward fills model.history
        model.eval()
        with torch.no_grad():
            model(ds.get_batch("val", 2, 0))
        model.train()
    out = plots.model_figures(model, ds, str(tmp_path))
    assert "warning" not in capsys.readouterr().out
    if expect is None:
        return
    assert str(tmp_path / expect) in out
    assert png_size(tmp_path / expect)[0] <= 1600


def test_model_figures_never_raise(tmp_path, capsys):
    model, ds = tiny("moma", "chameleon")
    model.history = [dict(mode="aux", counts="not a list", acc=None)]   # a broken record: the figure fails, the run must not
    out = plots.model_figures(model, ds, str(tmp_path))
    assert "warning: plots.model_figures" in capsys.readouterr().out
    assert str(tmp_path / "moma_routing_tokens.png") in out


def test_cli_list_and_bad_command(capsys):
    assert plots.main(["list"]) == 0
    assert "python plots.py docs toy_world" in capsys.readouterr().out
    assert plots.main(["nonsense"]) == 2
    assert plots.main(["compare", "/nonexistent", "dense,mot"]) == 2


def test_cli_compare_reproduces_the_shipped_summary(tmp_path, capsys):
    """`python plots.py compare DIR a,b` on finished runs writes the same compare.json as `train.py --compare` did
    (docs/runs/chameleon_moma ships both), and a run without eval rows is one line and exit 2."""
    import shutil
    src = os.path.join(plots.RUNS, "chameleon_moma")
    shipped = json.load(open(os.path.join(src, "compare.json")))
    for n in ("dense", "mot", "moma"):
        os.makedirs(tmp_path / n)
        shutil.copy(os.path.join(src, n, "metrics.jsonl"), tmp_path / n / "metrics.jsonl")
    assert plots.main(["compare", str(tmp_path), "dense,mot,moma", str(tmp_path / "c.png"), "--out", str(tmp_path)]) == 0
    assert json.load(open(tmp_path / "compare.json")) == shipped
    assert (tmp_path / "c.png").exists()
    open(tmp_path / "mot" / "metrics.jsonl", "w").write(json.dumps(dict(step=1, loss=5.0)) + "\n")
    capsys.readouterr()
    assert plots.main(["compare", str(tmp_path), "dense,mot"]) == 2
    assert "no eval rows" in capsys.readouterr().err


def test_cli_compare_never_writes_into_the_runs_it_reads(tmp_path, monkeypatch):
    """README's example `python plots.py compare docs/runs/chameleon dense,mot` writes under out/ (or --out), and
    leaves every shipped file as it is."""
    import subprocess
    root = os.path.dirname(plots.DOCS)
    status = lambda: subprocess.run(["git", "status", "--porcelain", "docs/"], cwd=root, capture_output=True, text=True)
    before = status()
    monkeypatch.chdir(tmp_path)
    assert plots.main(["compare", os.path.join(plots.RUNS, "chameleon"), "dense,mot"]) == 0
    assert (tmp_path / "out" / "compare_chameleon" / "compare.json").exists()
    assert (tmp_path / "out" / "compare_chameleon" / "compare.png").exists()
    assert plots.main(["compare", os.path.join(plots.RUNS, "chameleon"), "dense,mot", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "compare.json").exists()
    if before.returncode == 0:                             # a git checkout (a tarball has nothing to compare)
        assert status().stdout == before.stdout          # (empty in a clean checkout)


def test_docs_figures_are_slide_ready(tmp_path, monkeypatch):
    """Every figure in docs/ (drawn here into tmp_path): at most MAX_ASPECT times as wide as high, every text at least
    SLIDE_PT when the figure is shown MAX_PX wide, and at most MAX_PX wide as saved."""
    import matplotlib.text
    seen = {}
    real = plots._save

    def check(fig, path, rect=None):
        out = real(fig, path, rect)                 # _save makes the text readable: what it saves is checked
        w, h = fig.get_size_inches()
        small = [(t.get_text()[:30], t.get_fontsize()) for t in fig.findobj(matplotlib.text.Text)
                 if t.get_visible() and t.get_text().strip() and t.get_fontsize() * plots.MAX_PX / (w * plots.DPI)
                 < plots.SLIDE_PT - 1e-6]
        seen[os.path.basename(path)] = (w / h, small)
        return out

    monkeypatch.setattr(plots, "_save", check)
    for name, (make, _) in plots.DOCS_FIGURES.items():
        make(str(tmp_path / f"{name}.png"))
        aspect, small = seen[f"{name}.png"]
        assert aspect <= plots.MAX_ASPECT + 1e-9, f"docs/{name}.png is {aspect:.2f}:1 wide"
        assert not small, f"docs/{name}.png: text below {plots.SLIDE_PT} pt at {plots.MAX_PX} px wide: {small[:5]}"
        assert png_size(tmp_path / f"{name}.png")[0] <= plots.MAX_PX
