"""Every @triton.jit kernel in kernels.py compiles ahead of time for every target of kernels.TRITON_TARGETS (A100
sm_80, A10 / RTX 30xx sm_86, L4 / RTX 40xx sm_89, H100 sm_90), in every dtype and configuration the launchers can
pick (gpu_check.compile_specs, built from kernels.launch_config), with no register spills (local memory), no stack,
shared memory within the target's per-block limit, and the tensor-core instructions expected for the grouped matmul.
No GPU needed: triton compiles for a target that is not present, and the wheel ships cuobjdump. Run under every Triton that requirements.txt admits (.ci/run: 3.8 and 3.9)."""
import inspect
import re

import pytest

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed (it has wheels for Linux only): nothing to compile", allow_module_level=True)

import gpu_check  # noqa: E402
import kernels as K  # noqa: E402

TARGETS = tuple(gpu_check.target_name(cap) for cap in K.TRITON_TARGETS)   # derived: a new target is compiled too


@pytest.fixture(scope="module")
def report():
    return gpu_check.static_report(K.TRITON_TARGETS)


def test_every_target_is_compiled_with_its_shared_memory_limit(report):
    assert {"sm_80", "sm_86", "sm_89", "sm_90"} <= set(TARGETS)
    assert set(gpu_check.SHARED_LIMIT) == set(TARGETS)
    assert gpu_check.SHARED_LIMIT["sm_86"] == gpu_check.SHARED_LIMIT["sm_89"] == 99 * 1024
    assert {r["target"] for r in report} == set(TARGETS)
    per_target = {t: sorted(r["name"] for r in report if r["target"] == t) for t in TARGETS}
    assert all(names == per_target["sm_80"] for names in per_target.values())   # every config on every target


def jit_objects():
    """Module-level @triton.jit objects (JITFunction, or the interpreter's stand-in under TRITON_INTERPRET=1)."""
    return {name: obj for name, obj in vars(K).items()
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and hasattr(obj, "fn")}


def problems(rec):
    """What is wrong with one compiled kernel's resource record (empty list = fine)."""
    if "error" in rec:
        return [f"does not compile: {rec['error'][:200]}"]
    out = []
    if rec["local"]:
        out.append(f"spills {rec['local']} bytes to local memory")
    if rec["stack"]:
        out.append(f"uses {rec['stack']} bytes of stack")
    shared = rec["static_shared"] + rec["dynamic_shared"]
    if shared > gpu_check.SHARED_LIMIT[rec["target"]]:
        out.append(f"needs {shared} B shared memory > {gpu_check.SHARED_LIMIT[rec['target']]} B")
    if rec["regs"] * rec["num_warps"] * 32 > 65536:
        out.append(f"{rec['regs']} registers x {rec['num_warps']} warps exceed the register file")
    return out


def test_every_jit_function_is_covered(report):
    jits = jit_objects()
    kernels = {n for n in jits if n.endswith("_kernel")}
    assert kernels, "no kernels found"
    for target in TARGETS:
        compiled = {r["kernel"] for r in report if r["target"] == target}
        missing = kernels - compiled
        assert not missing, f"kernels with no compile spec for {target}: {sorted(missing)} (add them to gpu_check.compile_specs)"
    sources = "".join(inspect.getsource(jits[n].fn) for n in kernels)
    for helper in set(jits) - kernels:   # a helper is covered by the kernels that call it
        assert re.search(rf"\b{helper}\b", sources), f"@triton.jit {helper} is neither a kernel nor used by one"


@pytest.mark.parametrize("target", TARGETS)
def test_compiles_without_spills_within_limits(report, target):
    recs = [r for r in report if r["target"] == target]
    assert recs
    bad = {r["name"]: problems(r) for r in recs if problems(r)}
    assert not bad, f"{target}: {bad}"


def test_grouped_matmul_uses_tensor_cores(report):
    by = {(r["name"], r["target"]): r for r in report}
    for dt in ("bf16", "fp32"):
        for t in (t for t in TARGETS if t != "sm_90"):   # Ampere and Ada: mma.sync
            assert by[(f"gmm[{dt}]", t)]["mma"], f"gmm[{dt}] has no mma.sync on {t}"
        assert by[(f"gmm[{dt}]", "sm_90")]["wgmma"], f"gmm[{dt}] has no wgmma on sm_90"
        assert by[(f"gmm_dw[{dt}]", "sm_90")]["wgmma"] or by[(f"gmm_dw[{dt}]", "sm_90")]["mma"]


def test_problems_flags_bad_records():
    ok = dict(target="sm_90", local=0, stack=0, static_shared=1024, dynamic_shared=65536, regs=128, num_warps=4)
    assert problems(ok) == []
    assert problems(dict(ok, local=8)) and problems(dict(ok, stack=16))
    assert problems(dict(ok, dynamic_shared=240 * 1024)) and problems(dict(ok, target="sm_80", dynamic_shared=170 * 1024))
    assert problems(dict(ok, target="sm_86", dynamic_shared=100 * 1024)) and not problems(dict(ok, target="sm_89"))
    assert problems(dict(ok, regs=255, num_warps=16)) and problems({"error": "x", "target": "sm_80"})
