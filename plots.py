"""Every figure in nanomix: training curves, compares, the papers' mechanisms, the toy world.

The paper files hold the method only; this file draws what they do. It reads run outputs (a train.py output directory:
config.json + metrics.jsonl) and models' public methods and attributes. One command per figure:

    python plots.py list                                  # every figure in docs/ and the command that makes it
    python plots.py docs NAME                             # remake docs/NAME.png (from docs/runs/ or the code itself)
    python plots.py run OUT_DIR                           # OUT_DIR/loss.png of one training run
    python plots.py compare BASE_OUT dense,mot [PNG] [--out DIR]   # eval curves of the runs BASE_OUT/NAME, the FLOPs
                                                          # table; compare.png/.json into DIR (out/compare_BASE)
    python plots.py mechanism MODEL [CKPT] [PNG]          # the mechanism figure of one model on a real batch
    python plots.py toy_world [PNG]                       # scenes, captions, a token stream per setting (out/)

The trainer calls plot_run(out) and model_figures(model, ds, out) at the end of a run, and plot_compare(base, names)
and summarize(names, base) after --compare. This file never imports train.py: it reads runs itself (rundir.read_jsonl)
and builds models with cli.py's checks. Every figure is at most 1600 px wide, has axis labels with
units and a title that says what it shows; the figures in docs/ are slide-ready: at most 2.5 times as wide as high,
and every label at least 12 pt when the figure is shown 1600 px wide (_save enlarges any smaller text).
"""
import json
import math
import os
import sys

import numpy as np
import torch

import cli
from rundir import read_jsonl

DPI = 100
MAX_PX = 1600
MAX_ASPECT = 2.5          # width / height of a docs figure: it fits a 16:9 slide with a title above it
SLIDE_PT = 12             # the smallest label, in points, when the figure is shown MAX_PX wide
DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs")
RUNS = os.path.join(DOCS, "runs")

def safely(draw, what):
    """draw(); a failing figure prints one warning line and never costs a finished run (its outputs are written)."""
    try:
        draw()
    except Exception as e:  # noqa: BLE001 -- the run's outputs are written already
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        print(f"warning: the {what} figure failed ({type(e).__name__}: {msg}); the run's outputs are complete")


# --- names a reader sees (never a raw metric key or an internal run name) ----------------------------------------
MODEL_NAMES = {
    "dense": "dense Transformer", "mot": "MoT", "mamba": "Mamba", "mom": "MoM (all four projections)",
    "mom-in": "MoM (in_proj only)", "mom-x": "MoM (x_proj only)", "mom-dt": "MoM (dt_proj only)",
    "mom-out": "MoM (out_proj only)", "moma": "MoMa 4t4i", "moma-1t1i": "MoMa 1t1i", "moma-mod": "MoMa 4t4i + MoD",
    "moma-ec8": "MoMa, 8 mixed-modal experts", "moma-upcycled": "MoMa upcycled from 1t1i",
    "transfusion": "Transfusion (dense)", "transfusion-mot": "Transfusion, MoT backbone",
    "transfusion-mamba": "Transfusion, Mamba backbone", "transfusion-mom": "Transfusion, MoM backbone",
    "lmfusion-base": "LMFusion text LM", "lmfusion": "LMFusion", "megabyte": "MEGABYTE", "blt": "BLT",
    "blt-entropy": "BLT entropy model", "megalodon": "Megalodon",
}
METRIC_NAMES = {
    "eval_loss": ("eval loss, all tokens", "loss (nats / token)"),
    "eval_loss_text": ("eval loss on text tokens", "loss (nats / token)"),
    "eval_loss_image": ("eval loss on image tokens", "loss (nats / token)"),
    "eval_loss_speech": ("eval loss on speech tokens", "loss (nats / token)"),
    "eval_bpb": ("eval bits per byte", "bits per byte"),
    "gen_image_acc": ("caption -> image: attributes right", "accuracy (fraction)"),
    "caption_acc": ("image -> caption: attributes right", "accuracy (fraction)"),
}
SETTING_NAMES = {"chameleon": "chameleon setting (text + image tokens)",
                 "speech": "speech setting (text + image + speech tokens)",
                 "transfusion": "transfusion setting (text + continuous images)", "text": "text setting",
                 "bytes": "bytes setting", "realtext": "realtext setting (real English bytes)"}


def model_name(n):
    return MODEL_NAMES.get(n, n)


def metric_name(k):
    if k in METRIC_NAMES:
        return METRIC_NAMES[k]
    if k.endswith("_aux") and k[:-4] in METRIC_NAMES:
        t, u = METRIC_NAMES[k[:-4]]
        return t + " (causal aux routers)", u
    if k.endswith("_ec") and k[:-3] in METRIC_NAMES:
        t, u = METRIC_NAMES[k[:-3]]
        return t + " (expert choice, non-causal)", u
    return k.replace("_", " "), k.split("_")[-1]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def min_font_pt(fig):
    """The smallest font size (points, in the figure's own inches) that reads as SLIDE_PT at MAX_PX wide."""
    return SLIDE_PT * fig.get_size_inches()[0] * DPI / MAX_PX


def _readable(fig, rect=None):
    """Enlarge every text of fig below min_font_pt(fig) to it, then lay the figure out again."""
    import matplotlib.text
    lo, grew = min_font_pt(fig), False
    for t in fig.findobj(matplotlib.text.Text):
        if t.get_fontsize() < lo:
            t.set_fontsize(lo)
            grew = True
    if grew and not fig.get_constrained_layout():
        fig.tight_layout(rect=rect or (0, 0, 1, 1))


def _save(fig, path, rect=None):
    """Save at <= MAX_PX wide (the DPI drops for a wide figure) and close it, every label readable (_readable;
    rect: the tight_layout rectangle the figure was drawn with). Returns the path."""
    plt = _plt()
    _readable(fig, rect)
    w = fig.get_size_inches()[0]
    d = min(DPI, MAX_PX / w)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=d)
    plt.close(fig)
    return path


def _wrap(text, fig, share=1.0):
    """Break a title into lines that fit the figure's width (about 11 characters per inch at 11 pt); share: the part
    of the width its axes take."""
    import textwrap
    return "\n".join(textwrap.wrap(text, int(fig.get_size_inches()[0] * 10 * share)))


def _flops_axis(ax, xs):
    """Training FLOPs on a linear axis in a readable unit: no overlapping log-scale labels."""
    top = max([x for x in xs if x] or [1.0])
    e = int(math.floor(math.log10(top))) if top > 0 else 0
    ax.set_xlabel(f"training FLOPs (x 1e{e})")
    return 10.0 ** e


# --- reading runs ------------------------------------------------------------------------------------------------
def read_run(out):
    """-> (train rows, eval rows, config dict or {}) of a train.py output directory."""
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    conf = {}
    p = os.path.join(out, "config.json")
    if os.path.isfile(p):
        conf = json.load(open(p))
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r], conf


def _describe(conf, tr, ev):
    """'chameleon setting ..., 1800 steps, seed 0' from a run's config (or its metrics when there is none)."""
    t = conf.get("train", {})
    steps = t.get("steps") or max([r.get("step", 0) for r in tr + ev] or [0])
    setting = conf.get("setting") or t.get("setting")
    s = SETTING_NAMES.get(setting, f"{setting} setting") if setting else "toy data"
    s += f", {steps} steps"
    if "seed" in t:
        s += f", seed {t['seed']}"
    return s


def flops_to_reach(ev, key, target):
    """First training FLOPs at which the eval curve reaches target (linear interpolation between evals), or None."""
    prev = None
    for r in ev:
        if key not in r:
            continue
        if r[key] <= target:
            if prev is None or prev[key] == r[key]:
                return r["flops"]
            f = (prev[key] - target) / (prev[key] - r[key])
            return prev["flops"] + f * (r["flops"] - prev["flops"])
        prev = r
    return None


def summarize(names, base_out, png=None, out=None):
    """The FLOPs each of names[1:] needs to reach names[0]'s final eval losses, from the finished runs in
    base_out/NAME: printed, written to out/compare.json (out defaults to base_out) and returned (train.py --compare
    and `compare` here)."""
    runs = {n: read_run(os.path.join(base_out, n))[1] for n in names}
    for n, ev in runs.items():
        if not ev:
            raise cli.UsageError(f"{os.path.join(base_out, n)} has no eval rows yet; let its run reach an eval")
    keys = [k for k in runs[names[0]][-1] if k.startswith("eval_loss") or k == "eval_bpb"]
    if "eval_bpb" in keys:  # bytes: one modality, and bpb says it all
        keys = ["eval_bpb"]
    first = runs[names[0]]
    total = first[-1]["flops"]
    summary = {}
    print(f"\nFLOPs each model needs to reach {names[0]}'s final eval loss (fraction of {names[0]}'s {total:.3g} FLOPs):")
    for k in keys:
        target = first[-1][k]
        for n in names[1:]:
            f = flops_to_reach(runs[n], k, target)
            summary[f"{n}/{k}"] = None if f is None else f / total
            final = runs[n][-1].get(k, float("nan"))
            print(f"  {k:18s} {n:16s} " + (f"{100 * f / total:6.1f}%" if f is not None else "not reached") +
                  f"   (final {final:.4f} vs {names[0]} {target:.4f})")
    out = out or base_out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(summary, f, indent=1)
    png = png or os.path.join(out, "compare.png")
    if os.path.exists(png):
        print(f"plot: {png}")
    return summary


# --- one run, several runs ---------------------------------------------------------------------------------------
def plot_run(out_dir, path=None):
    """out_dir/loss.png: training loss per modality (light) and eval losses (dots) against training FLOPs."""
    plt = _plt()
    tr, ev, conf = read_run(out_dir)
    if not tr and not ev:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [r["flops"] for r in tr + ev]
    u = _flops_axis(ax, xs)
    for j, k in enumerate(k for k in (tr[0] if tr else {}) if k.startswith("loss")):
        part = k[5:] or "all tokens"
        ax.plot([r["flops"] / u for r in tr if k in r], [r[k] for r in tr if k in r], color=f"C{j}", alpha=0.35,
                lw=1, label=f"train, {part}")
    for j, k in enumerate(k for k in (ev[0] if ev else {}) if k.startswith("eval_loss") and not k.endswith("_aux")):
        part = k[10:] or "all tokens"
        ax.plot([r["flops"] / u for r in ev if k in r], [r[k] for r in ev if k in r], "o-", ms=3, color=f"C{j}",
                label=f"eval, {part}")
    ax.set_ylabel("loss (nats / token)")
    ax.set_yscale("log")
    name = conf.get("model") or os.path.basename(os.path.normpath(out_dir))
    ax.set_title(f"{model_name(name)}: training and eval loss, {_describe(conf, tr, ev)}", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, path or os.path.join(out_dir, "loss.png"))


def plot_compare(base_out, names, path=None, keys=None, labels=None, title=None, baseline=None, chance=True,
                 aux=True, verbose=False):
    """Eval curves of the runs base_out/NAME (NAME in names) against training FLOPs, one panel per metric, saved to
    path (default base_out/compare.png). keys: the metrics (default: every eval loss, or bits per byte on bytes);
    labels: {run name: legend label}; accuracy panels draw the chance level dashed; a run that logged the same metric
    under causal auxiliary routing (MoMa's `_aux` keys) draws it dashed. The dotted line is the baseline's (the first
    run's) final value. Returns {run: {key: fraction of the baseline's FLOPs to reach its final value or None}}."""
    plt = _plt()
    labels = dict(labels or {})
    runs = {}
    for n in names:
        d = os.path.join(base_out, n)
        if os.path.isfile(os.path.join(d, "metrics.jsonl")):
            runs[n] = read_run(d)
    if not runs:
        raise FileNotFoundError(f"no metrics.jsonl under {base_out}/{{{','.join(names)}}}")
    base = baseline or next(iter(runs))
    last = runs[base][1][-1] if runs[base][1] else {}
    if keys is None:
        keys = [k for k in last if k.startswith("eval_loss") and not k.endswith(("_aux", "_ec"))]
        if "eval_bpb" in last:
            keys = ["eval_bpb"]
        if len(keys) > 1 and "eval_loss" in keys:       # the per-modality panels say it; overall is in the table
            keys.remove("eval_loss")
    keys = [k for k in keys if any(k in r for _, ev, _ in runs.values() for r in ev)]
    n = len(keys)
    cols = n if n < 4 else 2                                   # four panels: 2 x 2, so the figure stays slide-shaped
    rows = math.ceil(n / cols)
    w = min(11.0, 3.6 * cols + 0.6)
    fig, axes = plt.subplots(rows, cols, figsize=(w, max(4.0 * rows, w / MAX_ASPECT)), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    allx = [r["flops"] for _, ev, _ in runs.values() for r in ev]
    for ax, k in zip(axes.flat, keys):
        u = _flops_axis(ax, allx)
        for j, (rn, (_, ev, _)) in enumerate(runs.items()):
            e = [r for r in ev if k in r]
            if not e:
                continue
            lab = labels.get(rn, model_name(rn))
            main = f"{lab}, causal aux routers" if any(k + "_ec" in r for r in e) else lab
            both = [r for r in e if k + "_ec" in r]
            gap = max([abs(r[k] - r[k + "_ec"]) for r in both] or [1.0])
            span = max(r[k] for r in e) - min(r[k] for r in e)
            if aux and both and gap < 0.01 * max(span, 1e-9):   # the two routings' curves would hide each other
                main = f"{lab}, aux routers = expert choice (to {gap:.3f})"
            ax.plot([r["flops"] / u for r in e], [r[k] for r in e], "o-", ms=3, color=f"C{j}", label=main)
            for suffix, what in (("_aux", "causal aux routers"), ("_ec", "expert choice (non-causal)")):
                if aux and any(k + suffix in r for r in e) and not (suffix == "_ec" and "=" in main):
                    ea = [r for r in e if k + suffix in r]    # MoMa: the other routing, dashed
                    ax.plot([r["flops"] / u for r in ea], [r[k + suffix] for r in ea], "--", color=f"C{j}", alpha=0.8,
                            label=f"{lab}, {what}")
            ck = k.replace("_acc", "_chance")
            if chance and ck != k and any(ck in r for r in e):
                ax.plot([r["flops"] / u for r in e if ck in r], [r[ck] for r in e if ck in r], ":", color=f"C{j}",
                        alpha=0.6, label=f"{lab}, chance")
        if k in last and not k.endswith("acc"):
            ax.axhline(last[k], color="gray", ls=":", lw=0.9)
            lo = min(r[k] for _, ev, _ in runs.values() for r in ev if k in r)
            hi = [r[k] for r in runs[base][1] if k in r]
            if len(hi) > 4:        # zoom on the part of the curves where they differ
                ax.set_ylim(lo - 0.05 * (hi[len(hi) // 5] - lo), hi[len(hi) // 5])
        t, unit = metric_name(k)
        if k == "eval_loss_image" and runs[base][2].get("setting") == "transfusion":   # diffusion, not next-token
            t, unit = "image diffusion loss (eval)", "noise-prediction MSE per image"
        if chance and any(k.replace("_acc", "_chance") in r for _, ev, _ in runs.values() for r in ev if k.endswith("_acc")):
            unit += "; dotted: chance"
        ax.set_title(t, fontsize=10)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    handles, names_ = axes[0][0].get_legend_handles_labels()     # below the panels: no curve hidden under it
    ncol = min(len(handles), 3)
    fig.legend(handles, names_, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    rect = (0, 0.075 * math.ceil(len(handles) / ncol) * 4.4 / fig.get_size_inches()[1], 1, 1)
    conf, tr, ev = runs[base][2], runs[base][0], runs[base][1]
    what = " vs ".join(labels.get(rn, model_name(rn)) for rn in runs)
    fig.suptitle(_wrap(title or f"{what}: eval curves at equal training FLOPs, {_describe(conf, tr, ev)}", fig),
                 fontsize=11)
    fig.tight_layout(rect=rect)
    _save(fig, path or os.path.join(base_out, "compare.png"), rect=rect)
    res = {}
    for rn, (_, ev, _) in runs.items():
        res[rn] = {}
        for k in keys:
            if k in last and ev and k in ev[-1] and not k.endswith("acc"):
                f = flops_to_reach(ev, k, last[k])
                res[rn][k] = None if f is None else f / last["flops"]
    if verbose:
        print(f"FLOPs to reach {model_name(base)}'s final value (fraction of its {last.get('flops', 0):.3g} FLOPs):")
        for rn, d in res.items():
            print(f"  {labels.get(rn, model_name(rn)):32s} " + " | ".join(
                f"{metric_name(k)[0]} " + ("not reached" if v is None else f"{100 * v:.1f}%") +
                f" (final {runs[rn][1][-1].get(k, float('nan')):.4f})" for k, v in d.items()))
    return res


# --- the toy world -------------------------------------------------------------------------------------------------
def _token_label(t, m, offsets):
    import data
    if m == 0 or len(offsets) < 2 or t < offsets[1]:
        return data.WORDS[t] if t < len(data.WORDS) else str(t)
    k = max(i for i, o in enumerate(offsets) if t >= o)
    return ("", "i", "s")[min(k, 2)] + str(t - offsets[k])


MOD_COLOURS = ("#cfe3ff", "#ffd9b3", "#d5f5d0", "#f0d0f5")
WEIGHT_COLOURS = ("#4c8be0", "#f08a24", "#3aa655", "#b05cc8", "#c8a23c", "#3cb8c8")  # one per modality (any number: cycled)


def _stream(ax, labels, mods, names, width=30, title=""):
    """Tokens as boxes coloured by modality, `width` per line."""
    rows = math.ceil(len(labels) / width)
    for i, (s, m) in enumerate(zip(labels, mods)):
        r, c = divmod(i, width)
        ax.add_patch(__import__("matplotlib").patches.Rectangle((c, -r - 0.9), 0.95, 0.8, color=MOD_COLOURS[m % 4]))
        ax.text(c + 0.47, -r - 0.5, s[:6], ha="center", va="center", fontsize=6.5, family="monospace")
    ax.set_xlim(0, width)
    ax.set_ylim(-rows - 0.1, 0.1)
    ax.axis("off")
    handles = [__import__("matplotlib").patches.Patch(color=MOD_COLOURS[i], label=n) for i, n in enumerate(names)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9, loc="left")


def toy_world(path="out/toy_world.png", n_scenes=8, seed=0):
    """The toy world in one picture: rendered scenes with their captions (top) and the first tokens of a training
    row of every setting, coloured by modality (bottom)."""
    import data
    plt = _plt()
    ds = data.make_data("chameleon", seq_len=256, seed=seed)
    ex = ds.scenes(n_scenes)
    fig = plt.figure(figsize=(12, 10))
    gs = fig.add_gridspec(6, n_scenes, height_ratios=[1.5, 1.05, 1.05, 1.05, 1.05, 0.45])
    for k, e in enumerate(ex):
        a = fig.add_subplot(gs[0, k])
        a.imshow(np.asarray(e["image"]).transpose(1, 2, 0))
        words = [data.WORDS[i] for i in e["caption"] if i < len(data.WORDS)]
        a.set_title("\n".join(__import__("textwrap").wrap(" ".join(words), 17)), fontsize=7)
        a.set_xticks([]), a.set_yticks([])
    fig.text(0.01, 0.985, "The toy world (data.py): scenes (16 x 16 RGB) with a caption of each, and the token stream of "
             "every setting", fontsize=12)
    names = list(getattr(data, "MODALITIES", ("text", "image", "speech")))
    for j, s in enumerate(("chameleon", "speech", "transfusion")):
        d = data.make_data(s, seq_len=96, seed=seed)
        b = d.get_batch("train", 1, 0)
        tok, mod = b["tokens"][0].tolist(), b["modality"][0].tolist()
        offs = d.model_fields().get("modality_offsets", (0,))
        if s == "transfusion":
            lab = ["patch" if m else _token_label(t, 0, (0,)) for t, m in zip(tok, mod)]
        else:
            lab = [_token_label(t, m, offs) for t, m in zip(tok, mod)]
        ax = fig.add_subplot(gs[1 + j, :])
        key = {"chameleon": "i12 = image token 12", "speech": "i12 = image token 12, s3 = speech code 3",
               "transfusion": "patch = one continuous 4 x 4 x 3 image patch"}[s]
        _stream(ax, lab[:66], mod[:66], names[:d.n_modalities], width=22,
                title=f"setting '{s}': the first 66 tokens of training row 0 ({key})")
    d = data.make_data("bytes", seq_len=512, seed=seed)
    b = d.get_batch("train", 1, 0)
    raw = bytes(b["tokens"][0, :240].tolist())
    kinds = b.get("byte_kind")
    ax = fig.add_subplot(gs[4, :])
    if kinds is not None:
        kinds = kinds[0, :240].tolist()
        _stream(ax, [chr(c) if 32 <= c < 127 else "?" for c in raw], kinds, ["caption text", "random", "predictable"],
                width=60, title="setting 'bytes': 240 bytes of training row 0, by kind (the ground truth of predictability)")
    else:
        ax.text(0, 0.5, raw.decode("latin-1"), fontsize=8, family="monospace", wrap=True)
        ax.axis("off")
    ax = fig.add_subplot(gs[5, :])
    ax.axis("off")
    ax.text(0, 0.9, "Every row is drawn from (seed, split, row index) alone. A document: <bos>, then caption/image pairs "
            "in either order (caption -> image = generation,\nimage -> caption = captioning); in chameleon and speech "
            "30% of the slots are text-only documents in a made-up language. Images are 16 tokens\nof a fixed k-means "
            "tokenizer of 4 x 4 patches (chameleon, speech) or 16 continuous patches (transfusion); speech codes follow "
            "the caption's words.", fontsize=9, va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    return _save(fig, path, rect=(0, 0, 1, 0.975))


# --- mechanism figures: the code's own objects on a real batch ---------------------------------------------------
def _row_labels(ds, batch, n):
    tok, mod = batch["tokens"][0, :n].tolist(), batch["modality"][0, :n].tolist()
    offs = ds.model_fields().get("modality_offsets", (0,))
    if "patches" in batch:
        return ["p" if m else _token_label(t, 0, (0,)) for t, m in zip(tok, mod)], mod
    return [_token_label(t, m, offs) for t, m in zip(tok, mod)], mod


def _weight_grid(ax, rows, copies, mod, labels, title):
    """rows: names of weight tensors; copies[r]: number of copies of row r. Cell (r, t) = the copy token t uses."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    k = len(WEIGHT_COLOURS)
    grid = np.array([[m % k if c > 1 else -1 for m in mod] for c in copies], float)
    cmap = ListedColormap(["#9a9a9a", *WEIGHT_COLOURS])
    ax.imshow(grid + 1, cmap=cmap, vmin=0, vmax=k, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=6.5, rotation=90, family="monospace")
    ax.set_xlabel("the first tokens of an eval row of the toy data, in order (i12 = image token 12)")
    ax.set_title(title, fontsize=10)


def mot_weights(model, ds, path, n=48):
    """MoT: which copy of every weight tensor of block 0 each token of a real row uses (grey = shared)."""
    batch = ds.get_batch("val", 1, 0)
    labels, mod = _row_labels(ds, batch, n)
    rows, copies = [], []
    block = model.blocks[0] if hasattr(model, "blocks") else model
    for name, m in block.named_modules():
        if hasattr(m, "n") and hasattr(m, "weight") and isinstance(m.weight, torch.nn.ParameterList):
            w = m.weight[0]
            rows.append(f"{name} ({w.shape[0]} -> {w.shape[1]})" if w.dim() == 2 else f"{name} (gain, {w.shape[0]})")
            copies.append(m.n)
    if all(c > 1 for c in copies):                   # everything untied: the dense model below it, for contrast
        rows, copies = [f"MoT: {', '.join(r.split(' (')[0] for r in rows)}",
                        "dense Transformer: the same tensors"], [2, 1]
    names = _modality_names(model)
    return _weight_figure(rows, copies, mod, labels, names, path,
                          "MoT block 0: the copy of each weight tensor that each token uses")


def _modality_names(model):
    names = getattr(model.cfg, "modality_names", ("text", "image", "speech"))
    return tuple(names[:model.cfg.n_modalities])


def _weight_figure(rows, copies, mod, labels, names, path, title):
    """The weight-copy grid (_weight_grid) with its modality legend, saved to path. Rows that colour the tokens alike
    (all per-modality, or all shared) are drawn as one row naming its tensors."""
    import textwrap
    plt = _plt()
    groups = {}
    for r, c in zip(rows, copies):
        groups.setdefault(c > 1, []).append(r)
    rows = ["\n".join(textwrap.wrap(", ".join(g), 34)) for g in groups.values()]
    copies = [2 if split else 1 for split in groups]
    fig, ax = plt.subplots(figsize=(11, 4.6))
    _weight_grid(ax, rows, copies, mod, labels, title)
    _legend_modalities(ax, [n if m in mod else None for m, n in enumerate(names)], shared=1 in copies)
    fig.tight_layout()
    return _save(fig, path)


def _legend_modalities(ax, names, shared=False):
    """Legend of the modality colours (names[m] None: modality m not drawn) and of grey = shared."""
    import matplotlib.patches as mp
    h = [mp.Patch(color=WEIGHT_COLOURS[i % len(WEIGHT_COLOURS)], label=f"{n} weights") for i, n in enumerate(names)
         if n is not None]
    if shared:
        h.append(mp.Patch(color="#9a9a9a", label="shared weights"))
    ax.legend(handles=h, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)


def mom_projections(model, ds, path, n=48):
    """MoM: which projections of a Mamba block are per-modality (in/x/dt/out_proj) and which shared (conv, A, D)."""
    batch = ds.get_batch("val", 1, 0)
    labels, mod = _row_labels(ds, batch, n)
    mixer = next(m for m in model.modules() if hasattr(m, "in_proj") and hasattr(m, "A_log"))
    rows, copies = [], []
    for name in ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj"):
        m = getattr(mixer, name)
        if hasattr(m, "weights"):
            w = m.weights[0]
            rows.append(f"{name} ({w.shape[0]} -> {w.shape[1]})")
            copies.append(len(m.weights))
        else:
            rows.append(f"{name} {tuple((m.weight if hasattr(m, 'weight') else m).shape)}")
            copies.append(1)
    return _weight_figure(rows, copies, mod, labels, _modality_names(model), path,
                          "Mixture-of-Mamba, one block: the copy of each projection that each token uses")


def transfusion_mask(model, ds, path, n=56):
    """Transfusion: model.attention_mask on a real row -- causal, and bidirectional inside each image."""
    plt = _plt()
    batch = ds.get_batch("val", 1, 0)
    idx = batch["image_index"][:, :n]
    mask = model.attention_mask(idx)[0, 0].cpu().numpy()
    labels, mod = _row_labels(ds, batch, n)
    fig, ax = plt.subplots(figsize=(9.5, 9))
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.4, interpolation="nearest")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=6.5, family="monospace")
    ax.set_yticks(range(n), labels, fontsize=6.5, family="monospace")
    ax.set_xlabel("key position j (p = an image patch)")
    ax.set_ylabel("query position i")
    ax.set_title(f"Transfusion attention mask on a transfusion-setting row (first {n} positions)\n"
                 f"blue = query i may attend to key j: causal everywhere, the whole image inside an image", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def moma_routing_tokens(model, ds, path, n=32, what="MoMa"):
    """MoMa: which expert each token goes to in every layer, under expert choice (training) and under the auxiliary
    routers (causal, inference), on a real batch (block.ffn.route on the hidden states that reach each FFN).
    what: the model, as the title names it."""
    plt = _plt()
    batch = ds.get_batch("val", 8, 0)
    ffns = [m for m in model.modules() if hasattr(m, "route") and hasattr(m, "router")]
    seen = []
    hooks = [f.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0].detach(), inp[1]))) for f in ffns]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch, routing="ec")
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    cfg = model.cfg
    modes = ["ec"] + (["aux"] if getattr(cfg, "aux_router", False) else [])
    L = len(seen)
    labels, mod = _row_labels(ds, batch, n)
    fig, axes = plt.subplots(L, len(modes), figsize=(11, max(2.2 * L + 1.4, 11 / MAX_ASPECT)), squeeze=False)
    E = cfg.n_experts_total
    names = getattr(cfg, "modality_names", ("text", "image", "speech"))
    ylab = [f"{names[m][0] if m < len(names) else m}{i}" for m, e in enumerate(cfg.group_experts) for i in range(e)]
    for l, (ffn, h, m_) in enumerate(seen):
        B, T, D = h.shape
        for c, mode in enumerate(modes):
            with torch.no_grad():
                tok, exp, g, _ = ffn.route(h.reshape(-1, D), m_.reshape(-1), mode)
            grid = np.zeros((E, n))
            if tok is not None:
                for t, e, gg in zip(tok.tolist(), exp.tolist(), g.tolist()):
                    if t < n:           # row 0's first n tokens
                        grid[e, t] = gg
            ax = axes[l][c]
            ax.imshow(grid, cmap="Greens", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            ax.set_yticks(range(E), ylab, fontsize=7)
            ax.set_ylabel(f"layer {l}: expert")
            ax.set_xticks(range(n), labels if l == L - 1 else [""] * n, rotation=90, fontsize=5.5, family="monospace")
            if l == 0:
                ax.set_title("expert choice (training; sees the whole batch)" if mode == "ec" else
                             "auxiliary routers (causal: each token decides alone)", fontsize=10)
    fig.suptitle(_wrap(f"{what}: routing of the first {n} tokens of a chameleon-setting eval row; green = the expert "
                       f"takes the token (shade = its gate); t = text experts, i = image experts", fig), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def moma_history(model, path):
    """MoMa: tokens routed per layer and expert at the last eval (expert choice vs aux routers) and aux-router
    accuracy over the evals, from model.history."""
    plt = _plt()
    recs = [r for r in getattr(model, "history", []) if "counts" in r and "acc" in r]
    if not recs:
        return None
    last, cfg = recs[-1], model.cfg
    L = len(last["counts"])
    names = getattr(cfg, "modality_names", ("text", "image", "speech"))
    xl = [f"{names[m] if m < len(names) else m} {i}" for m, e in enumerate(cfg.group_experts) for i in range(e)]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.2))
    w = 0.8 / (2 * L)
    xs = np.arange(len(xl))
    for l in range(L):
        ax[0].bar(xs + 2 * l * w, last["counts"][l], w, label=f"layer {l}, expert choice", color=f"C{l}", alpha=0.45)
        if "aux_counts" in last:
            ax[0].bar(xs + (2 * l + 1) * w, last["aux_counts"][l], w, label=f"layer {l}, aux routers", color=f"C{l}")
    ax[0].set_xticks(xs + 0.4 - w / 2, xl, fontsize=8, rotation=30)
    ax[0].set_xlabel("expert (modality group, index)")
    ax[0].set_ylabel("fraction of the group's tokens")
    ax[0].set_title("tokens routed per layer and expert (last eval)", fontsize=10)
    ax[0].legend(fontsize=7, ncol=2)
    for l in range(L):
        ax[1].plot(range(1, len(recs) + 1), [r["acc"][l] for r in recs], "o-", ms=3, label=f"experts, layer {l}",
                   color=f"C{l}")
        if recs[0]["mod_acc"][l] is not None:
            ax[1].plot(range(1, len(recs) + 1), [r["mod_acc"][l] for r in recs], "--", label=f"MoD, layer {l}",
                       color=f"C{l}")
    ax[1].axhline(1 - min(1.0, cfg.capacity_factor / max(cfg.group_experts)), color="gray", ls=":",
                  label="always 'not chosen'")
    ax[1].set_xlabel("eval batch (in training order)")
    ax[1].set_ylabel("aux-router accuracy (fraction)")
    ax[1].set_title("auxiliary routers: how often they predict expert choice", fontsize=10)
    ax[1].legend(fontsize=7)
    fig.suptitle("MoMa routing, measured on the eval batches of the run", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def megabyte_layout(model, ds, path, n_patches=4):
    """MEGABYTE: how a real byte row is cut into patches, what the global model sees (the previous patch; a pad
    patch first) and what the local model sees at each byte (the previous byte in the patch; a pad at p = 0)."""
    plt = _plt()
    import matplotlib.patches as mp
    P, r = model.cfg.patch_size, getattr(model.cfg, "cross_patch", 0)
    batch = ds.get_batch("val", 1, 0)
    by = batch["tokens"][0, :P * n_patches].tolist()
    ch = [chr(c) if 32 <= c < 127 else "?" for c in by]
    w = min(11.0, 0.3 * P * n_patches + 3)
    fig, ax = plt.subplots(figsize=(w, max(4.4, w / MAX_ASPECT)))
    local = [("_" if i % P == 0 else ch[i - 1]) for i in range(len(ch))]
    if hasattr(model, "patch_layout"):       # the model's own account: trainer position t predicts byte t + 1
        lay = model.patch_layout(len(ch))
        local = ["_"] + [("_" if r < 0 else ch[r]) for r in lay["local_reads"][:-1].tolist()]
    rows = [("bytes x_t (targets)", ch),
            ("global input: patch k-1\n(pad patch for k = 0)", ["_"] * P + ch[:-P]),
            ("local input: byte t-1\nin the patch (pad at p=0)", local)]
    for y, (name, cells) in enumerate(rows):
        for i, c in enumerate(cells):
            k = i // P
            ax.add_patch(mp.Rectangle((i, -y - 0.9), 0.92, 0.8, color=f"C{k % 10}", alpha=0.25 if y else 0.45))
            ax.text(i + 0.46, -y - 0.5, c, ha="center", va="center", fontsize=9, family="monospace")
        ax.text(-0.5, -y - 0.5, name, ha="right", va="center", fontsize=8.5)
    for k in range(n_patches + 1):
        ax.axvline(k * P - 0.04, color="k", lw=1)
    if r:
        ax.annotate("", xy=(P - r, -3.2), xytext=(2 * P - 0.5, -3.2),
                    arrowprops=dict(arrowstyle="->", color="C3"))
        ax.text(P - r, -3.55, f"cross_patch r = {r}: the local model of patch k also attends to the last {r} bytes of "
                f"patch k-1", fontsize=8, color="C3")
    ax.set_xlim(-0.2, P * n_patches + 0.2)
    ax.set_ylim(-3.9, 0.2)
    ax.set_yticks([])
    ax.set_xticks([k * P + P / 2 for k in range(n_patches)], [f"patch {k}" for k in range(n_patches)])
    ax.set_xlabel(f"byte position t (patch size P = {P}); one global step per patch, P local steps inside it")
    ax.set_title(_wrap("MEGABYTE on a bytes-setting row: what the global model reads at patch k (patch k-1) and what the "
                       "local model reads at each byte (the previous byte of the patch)", fig), fontsize=10)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def megabyte_patch_position(model, path):
    """MEGABYTE: eval loss by byte index inside a patch, from model.patch_pos_loss (sum, count per p)."""
    plt = _plt()
    if hasattr(model, "patch_position_bits"):
        bits = model.patch_position_bits()
    else:
        s, n = model.patch_pos_loss.detach().cpu()
        bits = None if n.sum() == 0 else s / n.clamp(min=1) / math.log(2)
    if bits is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(bits)), bits.float().numpy(), "o-")
    ax.set_xlabel("byte index p within its patch")
    ax.set_ylabel("eval loss (bits per byte)")
    ax.set_title(f"MEGABYTE (P = {len(bits)}): eval loss by position in the patch\n(the paper's reason for strided "
                 f"inference, Sec. 2.3.3)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def blt_patches(model, tokens, path, n=96, kinds=None, what="BLT"):
    """BLT (paper Fig. 4): the first n bytes of `tokens` (1-D), the entropy model's H(x_i) and the patch starts;
    kinds (1-D, optional): the data's byte kinds (0 caption, 1 random, 2 predictable), shaded. what: the model, as the
    title names it."""
    plt = _plt()
    off = 4 if not hasattr(sys.modules.get("blt"), "OFFSET") else sys.modules["blt"].OFFSET
    dev = next(model.parameters()).device
    x = tokens[:n].long()[None].to(dev) + off
    was = model.training
    model.eval()
    with torch.no_grad():
        ent = model.entropies(x) if getattr(model, "entropy_model", None) is not None else None
        starts = model.patch(x, ent)[0, :x.shape[1]].cpu()
    model.train(was)
    chars = [chr(b) if 32 <= b < 127 else "?" for b in tokens[:n].tolist()]
    fig, ax = plt.subplots(figsize=(11, 4.6))
    if ent is not None:   # H(x_i) = ent[i - 1]: the entropy of the byte at i before seeing it
        H = [float("nan")] + ent[0, :-1].cpu().tolist()
        ax.plot(range(len(chars)), H, "-o", ms=3, color="tab:blue", label="H(x_i): entropy model's next-byte entropy")
        if model.cfg.patching in ("entropy", "monotonic"):
            ax.axhline(float(model.threshold), color="tab:red", ls="--", lw=1,
                       label=f"threshold = {float(model.threshold):.2f} nats")
    for i in starts.nonzero().flatten().tolist():
        ax.axvline(i - 0.5, color="gray", lw=0.8)
    if kinds is not None:
        import matplotlib.patches as mp
        shade = {1: ("#f6c9a0", "random bytes"), 2: ("#c8ecc4", "predictable bytes")}
        for i, k in enumerate(kinds[:n].tolist()):
            if k in shade:
                ax.axvspan(i - 0.5, i + 0.5, color=shade[k][0], alpha=0.5, lw=0)
        handles = [mp.Patch(color=c, alpha=0.5, label=l) for c, l in shade.values()]
        ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=8, loc="upper center", ncol=2,
                  bbox_to_anchor=(0.5, -0.2), frameon=False)      # below the axes: the random bytes stay visible
    ax.set_xticks(range(len(chars)), chars, fontsize=7, family="monospace")
    ax.set_xlim(-0.5, len(chars) - 0.5)
    ax.set_xlabel("byte of a bytes-setting eval row (grey line = a patch starts here)")
    ax.set_ylabel("entropy (nats)")
    ax.set_title(_wrap(f"{what}, {model.cfg.patching} patching: {int(starts.sum())} patches for {len(chars)} bytes "
                       f"(mean {len(chars) / max(1, int(starts.sum())):.1f} bytes per patch"
                       + (f", at most {model.cfg.max_patch_len})" if getattr(model.cfg, "max_patch_len", 0) else ")"),
                       fig), fontsize=10)
    if ent is not None and kinds is None:
        ax.legend(loc="upper right", fontsize=8)
    if ent is None:
        ax.set_yticks([])
        ax.set_ylabel("")
    fig.tight_layout()
    return _save(fig, path)


def megalodon_cema(model, path, n_chunks=3, n_channels=6, what="Megalodon"):
    """Megalodon: the impulse response of layer 0's CEMA (its output for a unit impulse, minus the omega skip) for its
    longest-memory channels, drawn against the attention chunk boundaries: whether the EMA reaches past a chunk.
    what: the model, as the title names it."""
    plt = _plt()
    cema = next(m for m in model.modules() if hasattr(m, "coeffs") and hasattr(m, "omega"))
    c = model.cfg.chunk_size
    L = min(c * n_chunks, model.cfg.seq_len)
    if hasattr(cema, "kernel"):                                 # (D, L): what the FFT path convolves with
        y = cema.kernel(L).t().float().cpu()
    else:
        x = torch.zeros(1, L, cema.dim)
        x[0, 0] = 1.0
        with torch.no_grad():
            y = cema(x)[0][0] - cema.omega.float() * x[0]      # (L, D): the EMA part of the response
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw=dict(width_ratios=[2, 1]))
    with torch.no_grad():
        slow = cema.coeffs(polar=True)[1][0].amax(dim=(1, 2))           # per channel: the largest |q|
    reach = 0                                                       # last t where a drawn response is above 1e-8
    for d in slow.argsort(descending=True)[:n_channels].tolist():     # the channels that remember longest
        r = y[:, d].abs()
        reach = max(reach, int((r > 1e-8).nonzero().max()) if (r > 1e-8).any() else 0)
        ax[0].plot(range(L), r.clamp(min=1e-9).numpy(), lw=1, label=f"channel {d}, max |q| {slow[d]:.3f}")
    ax[0].set_yscale("log")
    ax[0].set_ylim(1e-9, None)
    for k in range(1, L // c + 1):
        ax[0].axvline(k * c, color="k", ls=":", lw=1)
    ax[0].set_xlabel(f"time step t after an impulse at t = 0 (dotted: chunk boundaries, chunk = {c})")
    ax[0].set_ylabel("|CEMA response y_t| (log scale)")
    where = (f"all below 1e-8 from t = {reach + 1}, before the first chunk boundary (t = {c})" if reach < c else
             f"above 1e-8 until t = {reach}, past the first chunk boundary (t = {c})")
    ax[0].set_title(_wrap(f"the {n_channels} longest-memory of {cema.dim} channels: {where}", fig, 0.6), fontsize=10)
    ax[0].legend(fontsize=7, ncol=2, loc="upper right")
    T, cc = 4 * 8, 8
    i = np.arange(T)
    m = (i[None, :] <= i[:, None]) & (i[None, :] // cc == i[:, None] // cc)
    ax[1].imshow(m, cmap="Blues", vmin=0, vmax=1.4, interpolation="nearest")
    ax[1].set_xlabel("key position (4 chunks of 8 shown)")
    ax[1].set_ylabel("query position")
    ax[1].set_title("chunk-wise attention:\ncausal inside a chunk only", fontsize=10)
    fig.suptitle(_wrap(f"{what}, layer 0: CEMA impulse responses (left), chunk-wise attention mask (right)", fig),
                 fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def transfusion_loss_by_t(model, path):
    """Transfusion: eval diffusion loss per timestep bucket, first and last eval (model.bucket_history)."""
    plt = _plt()
    hist = getattr(model, "bucket_history", None) or getattr(model, "_bucket_history", None)
    if not hist:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, res in (("first eval", hist[0]), ("last eval", hist[-1])):
        ts = [int(k[-4:]) for k in res]
        ax.plot(ts, list(res.values()), marker="o", label=label)
    ax.set(xlabel="diffusion timestep t (bucket centre, of 1000)", ylabel="eval noise-prediction MSE", yscale="log")
    ax.set_title(f"Transfusion ({model.cfg.backbone} backbone): diffusion loss by timestep", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, path)


def transfusion_samples(model, ds, path, n=6, guidance=None, what=None):
    """Transfusion: for n fixed eval captions (the generation eval's first n scenes), the generated image (top), the
    scorer's reading of it (data.classify_image: the attributes it gets right of 4) and the data's own image (bottom).
    what: the model, as the title names it."""
    import data
    plt = _plt()
    ex = ds.scenes(n)
    with torch.no_grad():
        imgs = ((model.images_for_captions([e["caption"] for e in ex], guidance=guidance).float().cpu() + 1) / 2)
    imgs = imgs.clamp(0, 1).numpy()
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n, 5.8))
    right = 0
    for k, e in enumerate(ex):
        words = [data.WORDS[i] for i in e["caption"] if i < len(data.WORDS) and i != data.SEP]
        read = data.classify_image(imgs[k])
        ok = sum(a == b for a, b in zip(read, e["scene"]))
        right += ok
        axes[0, k].imshow(imgs[k].transpose(1, 2, 0))
        axes[0, k].set_title("\n".join(" ".join(words[j:j + 4]) for j in range(0, len(words), 4)), fontsize=8)
        thing, where = data.describe_scene(read).split(", ")
        axes[0, k].set_xlabel(f"read: {thing}\n{where}: {ok} of 4 right", fontsize=8,
                              color="#1a7f37" if ok == 4 else "#b42318")
        axes[1, k].imshow(np.asarray(e["image"]).transpose(1, 2, 0))
        for a in axes[:, k]:
            a.set_xticks([]), a.set_yticks([])
    axes[0, 0].set_ylabel("generated", fontsize=9)
    axes[1, 0].set_ylabel("data", fontsize=9)
    what = what or f"Transfusion ({model.cfg.backbone} backbone)"
    fig.suptitle(_wrap(f"{what}: images generated from {n} eval captions (top; {right} of {4 * n} attributes read "
                       f"back as captioned) and the data's images (bottom)", fig), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _blt_fig(model, ds, path):
    return blt_patches(model, ds.get_batch("val", 1, 0)["tokens"][0], path)


# model family (its file) -> (file name, figure(model, ds, path), when it applies)
MECHANISMS = {
    "mot": ("mot_weights.png", mot_weights, lambda m, ds: m.cfg.n_modalities > 1),
    "mom": ("mom_projections.png", mom_projections, lambda m, ds: m.cfg.n_modalities > 1),
    "moma": ("moma_routing_tokens.png", moma_routing_tokens, lambda m, ds: True),
    "transfusion": ("transfusion_mask.png", transfusion_mask, lambda m, ds: ds.setting == "transfusion"),
    "megabyte": ("megabyte_layout.png", megabyte_layout, lambda m, ds: True),
    "blt": ("blt_patches.png", _blt_fig, lambda m, ds: hasattr(m, "patch")),
    "megalodon": ("megalodon_cema.png", lambda m, ds, p: megalodon_cema(m, p), lambda m, ds: True),
}


def mechanism(model, ds, out_dir=None, path=None):
    """The mechanism figure of model's family (out_dir/its file name, or path); None if the family has none."""
    fam = type(model).__module__.split(".")[-1]
    if fam not in MECHANISMS or not MECHANISMS[fam][2](model, ds):
        return None
    name, fig, _ = MECHANISMS[fam]
    return fig(model, ds, path or os.path.join(out_dir, name))


def model_figures(model, ds, out_dir):
    """End-of-run figures of a model family into out_dir (replaces the models' old extra_plots). Never raises: a
    figure that fails prints one warning line, so a finished run is never lost to a plot."""
    done = []
    fam = type(model).__module__.split(".")[-1]
    jobs = [("mechanism", lambda: mechanism(model, ds, out_dir))]
    if fam == "moma":
        jobs.append(("moma routing", lambda: moma_history(model, os.path.join(out_dir, "moma_routing.png"))))
    if fam == "megabyte":
        jobs.append(("patch position", lambda: megabyte_patch_position(model, os.path.join(out_dir,
                                                                                         "megabyte_patch_position.png"))))
    if fam == "transfusion" and ds.setting == "transfusion":
        jobs.append(("loss by t", lambda: transfusion_loss_by_t(model, os.path.join(out_dir, "transfusion_loss_by_t.png"))))
        jobs.append(("samples", lambda: transfusion_samples(model, ds, os.path.join(out_dir, "transfusion_samples.png"))))
    for what, job in jobs:
        try:
            p = job()
            if p:
                done.append(p)
        except Exception as e:  # noqa: BLE001 -- a figure must never cost a finished run
            print(f"warning: plots.model_figures: the {fam} {what} figure failed ({type(e).__name__}: {e})")
    return done


# --- the figures in docs/, each from docs/runs/ or from the code on a real batch --------------------------------
def bytes_compare(base, path, names=("dense", "megabyte", "blt", "megalodon")):
    """The byte models: eval bits per byte vs training FLOPs, and final bpb vs inference FLOPs per byte when the
    runs carry it (base/NAME/flops.json: {"infer_flops_per_byte": ..}) -- one figure for all four papers."""
    plt = _plt()
    runs = {n: read_run(os.path.join(base, n)) for n in names if os.path.isfile(os.path.join(base, n, "metrics.jsonl"))}
    inf = {}
    for n in runs:
        f = os.path.join(base, n, "flops.json")
        if os.path.isfile(f):
            inf[n] = json.load(open(f))
    fig, ax = plt.subplots(1, 2 if inf else 1, figsize=(13 if inf else 7.5, 4.3), squeeze=False)
    ax = ax[0]
    allx = [r["flops"] for _, ev, _ in runs.values() for r in ev]
    u = _flops_axis(ax[0], allx)
    for j, (n, (tr, ev, conf)) in enumerate(runs.items()):
        ax[0].plot([r["flops"] / u for r in ev], [r["eval_bpb"] for r in ev], "o-", ms=3, color=f"C{j}",
                   label=model_name(n))
    ax[0].set_ylabel("eval bits per byte")
    ax[0].set_title("eval bits per byte vs training FLOPs", fontsize=10)
    ax[0].legend(fontsize=8)
    ax[0].grid(alpha=0.3)
    if inf:
        for j, n in enumerate(runs):
            if n in inf:
                x, y = inf[n]["infer_flops_per_byte"] / 1e6, runs[n][1][-1]["eval_bpb"]
                ax[1].scatter(x, y, s=40, color=f"C{j}")
                ax[1].annotate(model_name(n), (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax[1].set_xlabel("inference MFLOPs per byte")
        ax[1].set_ylabel("final eval bits per byte")
        ax[1].set_title("final eval bpb vs inference cost", fontsize=10)
        ax[1].grid(alpha=0.3)
    first = next(iter(runs.values()))
    what = " vs ".join(model_name(n) for n in runs)
    ax[0].axhline(first[1][-1]["eval_bpb"], color="gray", ls=":", lw=0.9)
    fig.suptitle(_wrap(f"{what}: eval bits per byte at equal training FLOPs, {_describe(first[2], first[0], first[1])}",
                       fig), fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def entropy_quality(path, base=os.path.join(RUNS, "realtext"), sweep=os.path.join(RUNS, "realtext_entropy"),
                    pairs=(("ent-s100", "blt-s100"), ("../realtext/blt-entropy", "../realtext/blt"),
                           ("ent-d64", "blt-d64"), ("ent-d128", "blt-d128")),
                    static=("blt-static", "../realtext_entropy/blt-static-seed1"), baseline="dense"):
    """BLT (paper Sec. 2.3): does entropy patching beat fixed stride once the entropy model is good enough? For each
    (entropy model run, BLT run) in `pairs` (dirs under `sweep`): the entropy model's final eval bpb -> BLT's training
    FLOPs to reach the baseline's final bpb (as a fraction of the baseline's; hollow: plus the entropy model's own
    training FLOPs) and BLT's final bpb; static patching (same mean patch size) as a line per run in `static` (dirs
    under `base`; a second seed shows the run-to-run spread). Returns the table rows."""
    plt = _plt()
    dense = read_run(os.path.join(base, baseline))[1]
    statics = [read_run(os.path.join(base, s))[1] for s in static
               if os.path.isfile(os.path.join(base, s, "metrics.jsonl"))]
    target, total = dense[-1]["eval_bpb"], dense[-1]["flops"]

    def frac(ev, extra=0.0):
        f = flops_to_reach(ev, "eval_bpb", target)
        return None if f is None else (f + extra) / total
    rows = []
    for e, b in pairs:
        ent, blt = read_run(os.path.join(sweep, e)), read_run(os.path.join(sweep, b))[1]
        rows.append(dict(entropy=os.path.basename(e), entropy_bpb=ent[1][-1]["eval_bpb"], blt_bpb=blt[-1]["eval_bpb"],
                         frac=frac(blt), frac_with_training=frac(blt, ent[1][-1]["flops"]),
                         patch=blt[-1].get("eval_patch_size")))
    rows.sort(key=lambda r: -r["entropy_bpb"])
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.6))
    x = [r["entropy_bpb"] for r in rows]
    for a, key, label in ((ax[0], "frac", "training FLOPs to reach the byte\nTransformer's final bpb (fraction)"),
                          (ax[1], "blt_bpb", "BLT's final eval bits per byte")):
        a.plot(x, [r[key] if r[key] is not None else float("nan") for r in rows], "o-", color="C0",
               label="entropy patching")
        for i, stat in enumerate(statics):
            s = frac(stat) if key == "frac" else stat[-1]["eval_bpb"]
            if s is not None:
                a.axhline(s, color="C1", ls="--" if i == 0 else ":",
                          label="static patching (stride 4)" + (f", seed {i}" if len(statics) > 1 else ""))
        a.set_xlabel("entropy model's eval bits per byte (better to the right)")
        a.set_ylabel(label, fontsize=9)
        a.invert_xaxis()
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax[0].plot(x, [r["frac_with_training"] if r["frac_with_training"] is not None else float("nan") for r in rows],
               "o:", mfc="none", color="C0", label="entropy patching + the entropy model's training")
    ax[0].legend(fontsize=8)
    fig.suptitle(_wrap("BLT on real text: entropy patching from entropy models of increasing quality vs fixed-stride "
                       "patching (mean patch 4, same training)", fig), fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return rows


def _model_from(name, ckpt=None, setting=None, overrides=None):
    """A model built with cli.py's checks (optionally loading a train.py checkpoint, weights only) and its data (seed
    0): the checkpoint's setting and seq_len, else the model's default setting and its Config's seq_len."""
    over, seq_len, reg = dict(overrides or {}), None, cli.registry()
    cli.check_model(name, reg)
    if ckpt:
        c = torch.load(ckpt, map_location="cpu", weights_only=True)
        if isinstance(c, dict) and "check" in c and not overrides:  # a shipped checkpoint (rundir.export): as shipped
            import rundir
            model, ds, _ = rundir.load_exported(ckpt)
            if c["config"]["model"] != name:
                raise ValueError(f"{ckpt} holds model {c['config']['model']!r}, not {name!r}")
            return model, ds
        conf = c.get("config", {}) if isinstance(c, dict) else {}
        mc = conf.get("model_cfg", {}) if isinstance(conf, dict) else {}
        over = {**{k: tuple(v) if isinstance(v, list) else v for k, v in mc.items()
                   if k not in ("entropy_ckpt", "upcycle_from", "lmfusion")}, **over}
        setting, seq_len = setting or conf.get("setting"), conf.get("train", {}).get("seq_len")
    setting = setting or reg[name][3]
    cli.check_setting(name, setting, reg)
    _, cfg_cls, _, _, base = reg[name]
    ds = cli.make_data(setting, seq_len or over.get("seq_len") or getattr(cfg_cls(**base), "seq_len", None), 0, None)
    cfg = cli.model_config(name, ds, over, reg)
    torch.manual_seed(0)
    model = cli.make_model(name, cfg, "cpu", reg)
    if ckpt:
        model.load_state_dict(c["model"], strict=False)
    return model, ds


CKPT = os.path.join(DOCS, "ckpt")


def _shipped(name):
    """The shipped trained model docs/ckpt/NAME.pt (rundir.load_exported) and its data, or FileNotFoundError."""
    import rundir
    path = os.path.join(CKPT, f"{name}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"docs/ckpt/{name}.pt: no such file; export it from a run (python train.py export)")
    return rundir.load_exported(path)


def blt_docs(path, n=96):
    """docs/blt_patches.png: the shipped trained BLT (docs/ckpt/blt.pt, its trained entropy model and threshold) on
    the first window of n bytes of an eval row that holds both predictable and random bytes."""
    model, ds, ck = _shipped("blt")
    b = ds.get_batch("val", 1, 0)
    row, kinds = b["tokens"][0], b["byte_kind"][0]
    start = next(s0 for s0 in range(0, len(kinds) - n, 8)          # a window with both kinds of bytes
                 if (kinds[s0:s0 + n] == 1).sum() >= 32 and (kinds[s0:s0 + n] == 2).sum() >= 32)
    return blt_patches(model, row[start:], path, n=n, kinds=kinds[start:],
                       what=f"trained BLT ({ck['step']} steps, docs/ckpt/blt.pt)")


def megalodon_docs(path):
    """docs/megalodon_cema.png: the CEMA of the shipped trained Megalodon (docs/ckpt/megalodon.pt)."""
    model, _, ck = _shipped("megalodon")
    return megalodon_cema(model, path, what=f"trained Megalodon ({ck['step']} steps, docs/ckpt/megalodon.pt)")


def moma_docs(path):
    """docs/moma_routing_tokens.png: the routing of the shipped trained MoMa (docs/ckpt/moma.pt)."""
    model, ds, ck = _shipped("moma")
    return moma_routing_tokens(model, ds, path, what=f"trained MoMa 4t4i ({ck['step']} steps, docs/ckpt/moma.pt)")


def transfusion_docs(path):
    """docs/transfusion_samples.png: images the shipped trained Transfusion (docs/ckpt/transfusion.pt) generates from
    the first captions of the generation eval."""
    model, ds, ck = _shipped("transfusion")
    return transfusion_samples(model, ds, path, what=f"trained Transfusion ({ck['step']} steps, "
                                                     f"docs/ckpt/transfusion.pt)")


def _mech(name, overrides=None):
    """docs figure maker: the mechanism of model `name` (default config and setting, seed 0) on a real eval batch: a
    figure of what the code does to the tokens, the same trained or not (the trained models: moma_docs, blt_docs)."""
    def f(path, ckpt=None):
        torch.manual_seed(0)
        model, ds = _model_from(name, ckpt, None, overrides)
        return mechanism(model, ds, path=path)
    return f


def _first_run_dir(*names):
    """The first of docs/runs/NAME that holds runs (the 1800-step headline compare, else a shorter one)."""
    for n in names:
        if os.path.isdir(os.path.join(RUNS, n)):
            return os.path.join(RUNS, n)
    return os.path.join(RUNS, names[0])


# name -> (function(path) that makes docs/NAME.png, the command, what it shows)
DOCS_FIGURES = {
    "toy_world": (lambda path: toy_world(path), "the toy world: scenes, captions, a token stream per setting"),
    "chameleon_compare": (lambda path: plot_compare(_first_run_dir("chameleon", "chameleon_moma"), ["dense", "mot"], path,
                                                    keys=["eval_loss_image", "eval_loss_text", "gen_image_acc"]),
                          "dense vs MoT on the chameleon setting (docs/runs/chameleon, else chameleon_moma)"),
    "mot_speech": (lambda path: plot_compare(os.path.join(RUNS, "speech"), ["dense", "mot"], path),
                   "dense vs MoT on the speech setting (docs/runs/speech)"),
    "moma_chameleon": (lambda path: plot_compare(os.path.join(RUNS, "chameleon"), ["dense", "mot", "moma"], path),
                       "dense vs MoT vs MoMa (causal eval) on the chameleon setting, 1800 steps (docs/runs/chameleon)"),
    "mom_chameleon": (lambda path: plot_compare(os.path.join(RUNS, "chameleon_mom"), ["mamba", "mom"], path),
                      "Mamba vs MoM on the chameleon setting (docs/runs/chameleon_mom)"),
    "transfusion_compare": (lambda path: plot_compare(os.path.join(RUNS, "transfusion"), ["transfusion", "transfusion-mot"],
                                                      path, keys=["eval_loss_image", "eval_loss_text"]),
                            "Transfusion dense vs MoT backbone, eval losses (docs/runs/transfusion; at 600 steps the "
                            "generation accuracies are still at chance, so they are not drawn)"),
    "bytes_compare": (lambda path: bytes_compare(os.path.join(RUNS, "bytes"), path, names=("dense", "megabyte", "blt",
                                                                                       "megalodon")),
                      "the byte models vs the byte Transformer (docs/runs/bytes)"),
    "realtext_compare": (lambda path: bytes_compare(os.path.join(RUNS, "realtext"), path, names=(
                             "dense", "megabyte", "blt", "blt-static", "megalodon")),
                         "the byte models vs the byte Transformer on real English (docs/runs/realtext)"),
    "realtext_entropy": (entropy_quality, "BLT on real text: entropy vs static patching as the entropy model improves "
                                          "(docs/runs/realtext, docs/runs/realtext_entropy)"),
    "mot_weights": (_mech("mot"), "MoT: the weight copy each token of a chameleon row uses"),
    "mom_projections": (_mech("mom"), "MoM: which projections each token takes per modality"),
    "moma_routing_tokens": (moma_docs, "MoMa: which expert takes each token, expert choice vs aux routers "
                                       "(docs/ckpt/moma.pt)"),
    "transfusion_mask": (_mech("transfusion"), "Transfusion: the attention mask of a real row"),
    "transfusion_samples": (transfusion_docs, "Transfusion: images the trained model generates from eval captions, "
                                              "read back by the scorer (docs/ckpt/transfusion.pt)"),
    "megabyte_layout": (_mech("megabyte"), "MEGABYTE: patches, global and local inputs of a real byte row"),
    "blt_patches": (blt_docs, "BLT: the trained entropy model's H and patch starts on a bytes row (docs/ckpt/blt.pt)"),
    "megalodon_cema": (megalodon_docs, "Megalodon: the trained CEMA's impulse responses and the attention chunks "
                                       "(docs/ckpt/megalodon.pt)"),
}


def main(argv):
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "list":
            for n, (_, what) in DOCS_FIGURES.items():
                print(f"python plots.py docs {n:22s} # docs/{n}.png: {what}")
        elif cmd == "docs":
            for n in rest:
                if n not in DOCS_FIGURES:
                    raise ValueError(f"unknown figure {n!r}; python plots.py list shows them")
            for n in rest or list(DOCS_FIGURES):
                try:
                    DOCS_FIGURES[n][0](os.path.join(DOCS, f"{n}.png"))
                    print(os.path.join("docs", f"{n}.png"))
                except FileNotFoundError as e:
                    if rest:
                        raise
                    print(f"skipped docs/{n}.png: {e}")     # `docs` alone: every figure whose runs are shipped
        elif cmd == "run" and rest:
            print(plot_run(rest[0]))
        elif cmd == "compare" and len(rest) >= 2:
            out = None
            if "--out" in rest:                    # never into BASE_OUT: it may be a shipped docs/runs directory
                i = rest.index("--out")
                if i + 1 >= len(rest):
                    raise ValueError("--out needs a directory")
                out, rest = rest[i + 1], rest[:i] + rest[i + 2:]
            out = out or os.path.join("out", "compare_" + os.path.basename(os.path.normpath(rest[0])))
            names = [n for n in rest[1].split(",") if n]
            png = rest[2] if len(rest) > 2 else os.path.join(out, "compare.png")
            plot_compare(rest[0], names, png)
            summarize(names, rest[0], png, out)    # the FLOPs table and out/compare.json
            print(f"wrote {os.path.join(out, 'compare.json')}")
        elif cmd == "mechanism" and rest:
            ckpt = next((a for a in rest[1:] if a.endswith(".pt")), None)
            png = next((a for a in rest[1:] if a.endswith(".png")), None)
            model, ds = _model_from(rest[0], ckpt)
            fam = type(model).__module__
            p = mechanism(model, ds, path=png or os.path.join("out", MECHANISMS.get(fam, ("none.png",))[0]))
            if p is None:
                raise ValueError(f"no mechanism figure for {rest[0]!r} on its setting")
            print(p)
        elif cmd == "toy_world":
            print(toy_world(rest[0] if rest else os.path.join("out", "toy_world.png")))   # docs/: `docs toy_world`
        else:
            print(f"error: unknown command {' '.join(argv)!r}; python plots.py --help lists them", file=sys.stderr)
            return 2
    except (FileNotFoundError, ValueError, cli.UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
