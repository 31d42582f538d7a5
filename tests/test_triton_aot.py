"""The ahead-of-time compile's ptxas check (fused_preact/triton_aot.py:
``_serialized``), which fails CI when ptxas serializes the wgmmas of a
default config: ptxas runs one wgmma at a time when a register of an
in-flight wgmma is written by another instruction before the wait (session
6 found every flat-loop 3x3 forward in that state with triton 3.6). Two
hand-written sm_90a kernels, the same two wgmmas with and without a move
into an accumulator register between them: the check must report the
first and pass the second, with the ptxas Triton ships (no GPU needed).
"""

import pytest

pytest.importorskip("triton")

from fused_preact.triton_aot import _serialized  # noqa: E402


def _two_wgmmas(redefine_accumulator: bool) -> str:
    acc = ",".join(f"%d{i}" for i in range(4))
    a = ",".join(f"%a{i}" for i in range(4))
    middle = "    mov.f32 %d0, 0f3F800000;\n" if redefine_accumulator else ""
    init = "".join(f"    mov.b32 %a{i}, 1065369472;\n    mov.f32 %d{i}, 0f00000000;\n" for i in range(4))
    store = "".join(f"    st.global.f32 [%rd1+{4 * i}], %d{i};\n" for i in range(4))
    return f""".version 8.0
.target sm_90a
.address_size 64

.visible .entry k(.param .u64 out, .param .u64 desc)
{{
    .reg .f32 %d<4>;
    .reg .b32 %a<4>;
    .reg .b64 %rd<3>;
    .reg .pred %p;
    ld.param.u64 %rd1, [out];
    ld.param.u64 %rd2, [desc];
{init}    setp.ne.b64 %p, %rd2, 0;
    wgmma.fence.sync.aligned;
    wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {{{acc}}}, {{{a}}}, %rd2, %p, 1, 1, 0;
    wgmma.commit_group.sync.aligned;
{middle}    wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {{{acc}}}, {{{a}}}, %rd2, 1, 1, 1, 0;
    wgmma.commit_group.sync.aligned;
    wgmma.wait_group.sync.aligned 0;
{store}    ret;
}}
"""


def test_ptxas_check_reports_serialized_wgmmas():
    assert "serialized" not in _serialized(_two_wgmmas(True), 90)  # the reason, without ptxas's preamble
    assert _serialized(_two_wgmmas(True), 90), "a register redefined between wgmmas must be reported"
    assert _serialized(_two_wgmmas(False), 90) == ""


def test_mainloop_count_finds_the_mma_loop():
    """triton_aot's loop measure (``loop_instructions``/``loop_mmas``, session
    7): the largest loop of a SASS listing that holds MMAs, counted from its
    backward branch's target to the branch; a larger loop without MMAs and a
    forward branch are not it. A listing in cuobjdump's format."""
    from fused_preact.triton_aot import _mainloop_of_sass

    lines = ["IMAD R1, R2, R3, RZ", "@P0 BRA 0x0060",  # a forward branch
             "LDS.128 R8, [R1]", "FFMA R4, R5, R6, R7",  # 0x0020: the MMA loop
             "HGMMA.64x128x16.F32.BF16 R24, R8, gdesc[UR4], R24, gsb0", "@P1 BRA 0x0020",
             "FADD R1, R1, R2", "FADD R1, R1, R2", "FADD R1, R1, R2", "FADD R1, R1, R2",  # 0x0060: no MMA
             "@P2 BRA 0x0060", "EXIT"]
    sass = "\n".join(f"        /*{16 * i:04x}*/                   {text} ;   /* 0x000fe20000000f00 */"
                     for i, text in enumerate(lines))
    assert _mainloop_of_sass(sass) == (4, 1)
    assert _mainloop_of_sass(sass.replace("HGMMA.64x128x16.F32.BF16", "HMMA.16816.F32.BF16")) == (4, 1)
    assert _mainloop_of_sass(sass.replace("HGMMA.64x128x16.F32.BF16", "FMUL")) == (-1, -1)
    # An mbarrier wait's retry block after the exit, branching back into the
    # loop (the TMA kernels): a larger "loop" holding the MMA and the EXIT, not it.
    retry = lines + ["SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2", "@!P0 BRA 0x00c0", "BRA 0x0020"]
    sass = "\n".join(f"        /*{16 * i:04x}*/                   {text} ;   /* 0x000fe20000000f00 */"
                     for i, text in enumerate(retry))
    assert _mainloop_of_sass(sass) == (4, 1)


def test_serialized_mode_still_fails_on_compile_failures():
    """--fail-on serialized (CI's triton 3.6 step) fails on serialized
    wgmmas and on kernels that do not compile, not on spills: session 9's
    first 3.6 compile failed a kernel that 3.8 took."""
    from fused_preact.triton_aot import failing

    bad = ["compile failed: k bf16 v [c] sm_90: CompilationError", "default config spills 8 bytes: k",
           "ptxas serializes the wgmmas (C7515): k", "no wgmma: k"]
    assert failing(bad, "serialized") == bad[0:1] + bad[2:3]
    assert failing(bad, "all") == bad and failing(bad[1:2], "serialized") == []


def test_l1_taps_copy_the_tiles_through_l1():
    """L1_TAPS (triton_kernels._rows_through_l1) changes how the dgrad's
    stride-1 3x3 tap tiles are copied, compiled for sm_90 (no GPU needed):
    16-byte ``cp.async.cg`` copies (L2 only) without it, none with it (the
    compiler falls back to 8-byte ``cp.async.ca``, cached in L1), the
    weight's copies being smaller ones (``.ca``) in both at this 16-column tile."""
    import json
    import os
    import subprocess
    import sys

    # In a process of its own: the test session runs the kernels under the
    # interpreter (tests/conftest.py), which cannot compile them.
    child = r"""
import json, re, sys
from fused_preact import triton_aot
counts = {}
for variant in ("3x3/s1", "3x3/s1,l1"):
    job = next(j for j in triton_aot._jobs(["bfloat16"], False)
               if j[0] == "conv_dgrad_kernel" and j[2] == variant
               and j[3]["BLOCK_N"] == 16 and j[3]["BLOCK_K"] == 16 and not j[3]["FLAT"])
    ptx = triton_aot.compile_ptx(90, job)
    counts[variant] = {kind: len(re.findall(r"cp\.async\." + kind + r"\.shared\.global", ptx)) for kind in ("cg", "ca")}
print(json.dumps(counts))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    plain, l1 = counts["3x3/s1"], counts["3x3/s1,l1"]
    assert plain["cg"] > 0 and plain["ca"] > 0, plain
    assert l1["cg"] == 0 and l1["ca"] > plain["ca"], l1


@pytest.mark.parametrize("dtype", ["float64", "fp64"])
def test_small_kernels_compile_fp64_as_fp64(dtype):
    """The job list's reductions take fp64 accumulators for fp64 data,
    whether the dtype is named as torch or as triton names it (the
    ``--dtype float64`` compile once built them with fp32 accumulators over
    fp64 pointers, which fails to compile: a loop-carried type mismatch)."""
    from fused_preact.triton_aot import _small_kernels

    flagged = [(kernel, c["IS_FP64"]) for kernel, _, c, *_ in _small_kernels(dtype) if "IS_FP64" in c]
    assert flagged and all(fp64 for _, fp64 in flagged), flagged
    assert not any(c.get("IS_FP64") for _, _, c, *_ in _small_kernels("bfloat16"))


def test_analysis_cache_keeps_an_answer_for_the_same_input(tmp_path, monkeypatch):
    """A reading of a compile (cuobjdump's loop count, ptxas's notes) comes
    from the analysis cache for an input read before, is recomputed for
    another input or another reader source, and is never cached with
    FUSED_PREACT_AOT_CACHE empty."""
    from fused_preact import triton_aot

    calls = []

    def reader(text):
        calls.append(text)
        return [len(text), text.count("x")]

    def helper():
        return 1

    monkeypatch.setenv("FUSED_PREACT_AOT_CACHE", str(tmp_path))
    assert triton_aot._cached(reader, "axx", sources=(helper,)) == [3, 2]
    assert triton_aot._cached(reader, "axx", sources=(helper,)) == [3, 2]
    assert calls == ["axx"], "the second call must come from the cache"
    assert triton_aot._cached(reader, "ax", sources=(helper,)) == [2, 1] and calls == ["axx", "ax"]
    # The same input read by a reader whose helper source differs: recomputed.
    assert triton_aot._cached(reader, "axx", sources=(triton_aot._cached,)) == [3, 2] and len(calls) == 3
    assert len(list(tmp_path.glob("reader-*.json"))) == 3 and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setenv("FUSED_PREACT_AOT_CACHE", "")
    triton_aot._cached(reader, "axx", sources=(helper,))
    assert len(calls) == 4
