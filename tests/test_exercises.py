"""README.md, EXERCISES.md and RESULTS.md run as written: every pytest command named there selects at least one
test, every `python train.py ...` command parses and builds each of its models (as train.py would, before training;
a command that needs a checkpoint trained by an earlier command is parsed and its keys checked), and every
`python plots.py ...` command names a known figure or subcommand."""
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import fields

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "EXERCISES.md", "RESULTS.md")
SHELL_VARS = {"$E": "out/blt-entropy/ckpt.pt", "$D": "out/compare"}   # RESULTS.md's BLT block sets these


def commands(prefix):
    """Every command starting with `prefix` in the docs' inline code and code blocks (split at && and ;, comments
    dropped), with where it was found."""
    found = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        spans = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        rest = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
        lines = [l for s in spans for l in s.splitlines()] + re.findall(r"`([^`\n]+)`", rest)
        for line in lines:
            line = line.split(" #")[0].strip()
            for part in re.split(r"&&|;", line):
                part = part.strip()
                for var, value in SHELL_VARS.items():
                    part = part.replace(var, value)
                if part.startswith(prefix):
                    found.append((doc, part))
    return found


PYTEST = commands("python -m pytest")
TRAIN = commands("python train.py")
PLOTS = commands("python plots.py")


def test_the_docs_name_commands():
    assert len(PYTEST) >= 18, "EXERCISES.md names a test command per exercise"
    assert any(c == "python -m pytest" for _, c in PYTEST), "README's test command"
    assert len(TRAIN) >= 8


COLLECT = r"""
import json, sys, pytest
codes = [int(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *a])) for a in json.loads(sys.argv[1])]
print("CODES" + json.dumps(codes))
"""


def test_every_pytest_command_selects_a_test():
    # one process collects for every command (pytest's own -k logic): exit 0 = something selected, 5 = nothing
    args = [shlex.split(c)[3:] for _, c in PYTEST]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", COLLECT, json.dumps(args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    line = [l for l in r.stdout.splitlines() if l.startswith("CODES")]
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    codes = json.loads(line[-1][5:])
    bad = [f"{doc}: {c} (pytest exit {code})" for (doc, c), code in zip(PYTEST, codes) if code != 0]
    assert not bad, "commands that select no test or fail to collect:\n" + "\n".join(bad)


def build_all(argv):
    """What `python train.py ARGV` builds before its first step: each model with its share of the keys."""
    import train
    flags, over = train.parse_args(argv)
    if "help" in flags:
        return []
    reg = train.registry()
    tc_keys = {f.name for f in fields(train.TrainConfig)}
    if "compare" in over:
        names = [n for n in over.pop("compare").split(",") if n]
        per = {n: {k: v for k, v in over.items() if k in tc_keys or k in {f.name for f in fields(reg[n][1])}}
               for n in names}
        for k in over:
            assert any(k in p for p in per.values()), f"--{k} is a key of none of {names}"
        setting = over.get("setting") or reg[names[0]][3]
        per = {n: {**p, "setting": setting} for n, p in per.items()}
    else:
        name = over.pop("model", train.TrainConfig.model)
        per = {name: over}
    built = []
    needs = [k for k in ("entropy_ckpt", "lmfusion", "upcycle_from") if k in over and not os.path.exists(over[k])]
    if needs:            # made by an earlier command of the same recipe: check the keys, do not build
        for n, o in per.items():
            keys = tc_keys | {f.name for f in fields(reg[n][1])}
            assert all(k in keys for k in o), f"unknown key in {sorted(o)} for {n}"
        return list(per)
    for n, o in per.items():
        t_over = {k: v for k, v in o.items() if k in tc_keys and k not in ("out",)}
        m_over = {k: v for k, v in o.items() if k not in tc_keys}
        if n == "lmfusion" and not os.path.exists(m_over.get("lmfusion", "out/lmfusion-base/ckpt.pt")):
            keys = {f.name for f in fields(reg[n][1])}
            assert all(k in keys for k in m_over)
            built.append((n, None))
            continue
        model, cfg, tc, ds = train.build(n, None, m_over, None, "cpu", t_over)
        if hasattr(train, "check_run"):
            train.check_run(n, model, tc, ds, 1, "cpu")
        built.append((n, tc.setting))
    return built


@pytest.mark.parametrize("doc,cmd", TRAIN, ids=[c for _, c in TRAIN])
def test_every_train_command_builds(doc, cmd, tmp_path, monkeypatch):
    import train
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(cmd)[2:]
    if argv == ["--help"]:
        assert train.main(argv) == 0
        return
    try:
        built = build_all(argv)
    except train.UsageError as e:
        pytest.fail(f"{doc}: `{cmd}` is refused: {e}")
    assert built


@pytest.mark.parametrize("doc,cmd", PLOTS, ids=[c for _, c in PLOTS])
def test_every_plots_command_is_known(doc, cmd):
    import plots
    a = shlex.split(cmd)[2:]
    assert a and a[0] in ("list", "docs", "run", "compare", "mechanism", "toy_world"), f"{doc}: {cmd}"
    if a[0] == "docs":
        assert all(n in plots.DOCS_FIGURES for n in a[1:]), f"{doc}: {cmd}"
    if a[0] == "mechanism":
        import train
        assert a[1] in train.registry(), f"{doc}: {cmd}"


def exercise_functions():
    """(module, dotted name) of every function an 'implement it yourself' exercise asks to rewrite."""
    text = open(os.path.join(ROOT, "EXERCISES.md")).read()
    out = []
    for sec in re.split(r"\n## ", text)[1:]:
        m = re.search(r"`(\w+)\.py`", sec.splitlines()[0])
        if not m:
            continue
        for name in re.findall(r"Rewrite[^`]*`([A-Za-z_][\w.]*)", sec):
            out.append((m.group(1), name))
    return out


def test_every_exercise_names_a_function_that_exists():
    import importlib
    found = exercise_functions()
    assert len(found) >= 14
    for mod, name in found:
        obj = importlib.import_module(mod)
        for part in name.split("."):
            assert hasattr(obj, part), f"EXERCISES.md asks to rewrite {mod}.{name}, which does not exist"
            obj = getattr(obj, part)
        assert callable(obj), f"{mod}.{name}"
