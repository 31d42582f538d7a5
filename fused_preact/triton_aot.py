"""Ahead-of-time compile of every Triton kernel for real GPUs, without a GPU.

    python -m fused_preact.triton_aot [--arch 80 90] [--dtype bfloat16 ...] [--all-configs] [--json FILE]

Each kernel is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` for every constexpr variant the
launchers use and every autotuning config they can launch with (``--all-configs``;
otherwise the configs the ResNet-164/ResNet-v2-50 channel counts pick), and
reports registers, spilled bytes (local memory, from the ``cuobjdump`` shipped
with Triton) and shared memory per config, and whether the GEMMs use ``wgmma``
(sm_90), how many wgmma groups the TTGIR leaves in flight, and whether ptxas
serializes them anyway (its C75xx notes, from the ``ptxas`` shipped with
Triton), and how many instructions a warp issues per step of the reduction
loop (the SASS, from ``cuobjdump``; in the JSON records). Exit status 1 when
a compile fails, a default config spills on sm_90, a fp16/bf16 GEMM has no
wgmma on sm_90, or ptxas serializes a default config's wgmmas on sm_90.

Must run with TRITON_INTERPRET unset (the kernels must be JIT functions).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
# Channel counts of the paper's CIFAR ResNet-164 and of ResNet-v2-50 units:
# they decide the tile widths the launchers pick.
MODEL_CHANNELS = (16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass
class Compiled:
    kernel: str
    arch: int
    dtype: str
    variant: str
    config: str
    default: bool
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    wgmma: bool = False
    # Most wgmma groups the kernel leaves in flight at a wait (Triton's
    # warp_group_dot_wait pendings): 0 = every MMA waited for before the
    # next step (no overlap with the next tile's loads and math); -1 = no wgmma.
    wgmma_pending: int = -1
    # Why ptxas serializes the kernel's wgmmas despite those pendings (its
    # C75xx "Potential Performance Loss" note), or "": every wgmma then waits
    # for the previous one, whatever the TTGIR says.
    serialized: str = ""
    # The reduction loop in the SASS: instructions a warp issues per step,
    # and how many of them are MMAs (the largest loop holding MMAs; -1: none).
    # Against the MMAs' tensor-core time this says whether a step is bound by
    # instruction issue (benchmarks/RESULTS.md, session 7).
    loop_instructions: int = -1
    loop_mmas: int = -1
    seconds: float = 0.0
    error: str = ""


# The arrival counters of the FINALIZE tails, and num_batches_tracked.
_INT_POINTERS = {"counter_ptr": "i32", "count_ptr": "i64"}


def _specialize(fn, dtype: str, constexprs: dict, pointer_dtypes: Optional[dict] = None) -> tuple[dict, dict, dict]:
    """(signature, attrs, constexprs) as the JIT would specialize a launch on
    channels_last tensors whose channel counts are multiples of 16: channel
    strides equal 1 (Triton turns an int argument equal to 1 into a
    constant), pointers, channel counts and the other strides divisible by 16.
    Without these the loads could not be vectorised and the report would
    describe a kernel that never runs. The weight's unit strides come with
    the variant (``constexprs``), and ``pointer_dtypes`` overrides a
    pointer's element type (an fp32 weight under autocast)."""
    stats = "fp64" if dtype == "fp64" else "fp32"
    data_ptrs = {"x_ptr", "act_ptr", "w_ptr", "res_ptr", "y_ptr", "gy_ptr", "gz_ptr", "gx_ptr"}
    channel_strides = {"sxc", "syc", "src", "sgc"}
    divisible = {"C", "K", "sxn", "sxh", "sxw", "syn", "syh", "syw", "srn", "srh", "srw", "sgn", "sgh", "sgw",
                 "swk", "swc", "swh", "sww", "sps", "spk", "spc", "sph", "A", "B", "ssb", "ssh", "ssw", "N"}
    sig, attrs, consts = {}, {}, dict(constexprs)
    for param in getattr(fn, "params", ()):  # constexprs left at their defaults (FINALIZE off)
        if param.is_constexpr and param.name not in consts and param.default is not inspect.Parameter.empty:
            consts[param.name] = param.default
    for i, name in enumerate(fn.arg_names):
        if name in channel_strides:
            consts[name] = 1
        if name in consts:
            sig[name] = "constexpr"
        elif name in (pointer_dtypes or {}) or name in _INT_POINTERS:
            sig[name] = "*" + {**_INT_POINTERS, **(pointer_dtypes or {})}[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            sig[name] = "*" + (dtype if name in data_ptrs else stats)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("momentum", "eps", "unbias"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, consts


# Reading a compile (cuobjdump -sass: ~0.8 s a conv kernel; ptxas again for
# its notes: 0.2-1 s) costs far more than the compile itself once Triton's
# cache holds it (~30 ms): with a warm cache they were all of CI's 8-minute
# sm_80+sm_90 run. Their answers are kept on disk, keyed by what they read
# (the cubin, or the PTX and arch; the Triton release whose tools read it) and by
# the source of the function that reads it, so a changed reader recomputes.
# FUSED_PREACT_AOT_CACHE: the folder (default ~/.cache/fused_preact/aot;
# empty: no cache).
def _cache_dir() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                           "fused_preact", "aot")
    return os.environ.get("FUSED_PREACT_AOT_CACHE", default)


def _cached(reader, *inputs, sources: tuple = ()):
    """``reader(*inputs)``, from the analysis cache where it was computed
    before for the same inputs (bytes, str or numbers: what the reader reads;
    its tools it finds itself, ``_tool``, since their folder changes with each
    CI venv), Triton release and source of ``reader`` and of the functions in
    ``sources``; a JSON value (tuples come back as lists)."""
    import triton

    directory = _cache_dir()
    if not directory:
        return reader(*inputs)
    digest = hashlib.sha256()
    for part in (triton.__version__, *(inspect.getsource(f) for f in (reader, *sources)), *inputs):
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    path = os.path.join(directory, f"{reader.__name__.strip('_')}-{digest.hexdigest()}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    value = reader(*inputs)
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
            json.dump(value, f)
        os.replace(f.name, path)  # (atomic: parallel jobs never read half a file)
    except OSError:
        pass
    return value


def _serialized(ptx: str, arch: int) -> str:
    """ptxas's reason for serializing the wgmmas of ``ptx`` (compiled again
    with the ptxas Triton ships, -v; Triton's own compile drops its notes), or ""."""
    ptxas = _tool("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {(out.stderr or out.stdout).strip()[:300]}")
    note = re.search(r"wgmma\.mma_async instructions are serialized due to (.*?) in the function", out.stdout + out.stderr)
    return note.group(1) if note else ""


def _tool(name: str) -> str:
    """The path of a CUDA tool Triton ships (ptxas, cuobjdump)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resources(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    # Spilled registers live in the stack frame (STACK) or local memory (LOCAL).
    spill = sum(int(m) for m in re.findall(r"(?:STACK|LOCAL):(\d+)", out))
    return int(reg.group(1)) if reg else -1, spill if reg else -1


def _mainloop(cubin: bytes) -> tuple[int, int]:
    """``_mainloop_of_sass`` of the cubin's ``cuobjdump -sass``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return _mainloop_of_sass(subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout)


def _mainloop_of_sass(sass: str) -> tuple[int, int]:
    """(instructions, MMA instructions) of the largest loop of a SASS listing
    that holds MMAs (HGMMA/HMMA): a loop is a backward branch and the
    instructions from its target; (-1, -1) if none. Not a "loop" holding
    an EXIT: the retries of a failed mbarrier wait (the TMA kernels) sit
    after the kernel's end and branch back into the reduction loop, which
    would make the whole kernel one."""
    code = [(int(addr, 16), text) for addr, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {addr: i for i, (addr, _) in enumerate(code)}
    best = (-1, -1)
    for i, (addr, text) in enumerate(code):
        branch = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        target = int(branch.group(1), 16) if branch else None
        if target is None or target >= addr or target not in index:
            continue
        body = [t for _, t in code[index[target]:i + 1]]
        if any(re.search(r"\bEXIT\b", t) for t in body):
            continue
        mmas = sum(1 for t in body if re.search(r"\b(HGMMA|HMMA)\b", t))
        if mmas and len(body) > best[0]:
            best = (len(body), mmas)
    return best


def _variants(kernel: str, dtype: str):
    """(variant label, constexprs without the block config, pointer dtype
    overrides) the launchers use. The forward and dgrad read a 1x1 weight in
    nn.Conv2d's layout and dtype (C contiguous; fp32 under autocast), a
    small 3x3 one likewise as it is (nn.Conv2d's layout or channels_last),
    and a larger one packed in the data dtype (K contiguous for the forward,
    C for dgrad: ``triton_launch._gemm_weight``), and a 1x1 one cast to the
    data dtype where the reduction is long (``,w-cast``); the stride-2 dgrad
    works in parity classes (PARITY); with 16-bit data the stride-1 GEMMs
    also read through TMA descriptors (``,tma``: their TMA configs only);
    the stride-1 3x3 forward and dgrad copy their taps' tiles through L1
    (``,l1``: L1_TAPS, every config); the stride-1 3x3 weight gradient takes
    a kernel row's taps a program (``,rows``: TAP_ROWS, its configs)."""
    import triton.language as tl

    from . import triton_launch as L

    dtype = _TYPE.get(dtype, dtype)
    dot = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}[dtype]
    common = {"IS_FP64": dtype == "fp64", "DOT_DTYPE": dot, "INPUT_PRECISION": "tf32" if dtype == "fp32" else "ieee",
              "WIDE_INDEX": False}
    param = "fp64" if dtype == "fp64" else "fp32"
    tma = dtype in ("fp16", "bf16")  # the TMA forms are offered for 16-bit data (triton_launch._tma_pixels)
    # The model channel counts are multiples of the reduction block (no
    # channel masks: EVEN_C/EVEN_K) and a channels_last model's x and gy have
    # dense rows (DENSE_ROWS); ",general" variants build the other form.
    even = {"conv_fwd_kernel": {"EVEN_C": True}, "conv_dgrad_kernel": {"EVEN_K": True},
            "conv_wgrad_kernel": {"DENSE_ROWS": True}}[kernel]
    for k, s in ((3, 1), (3, 2), (1, 1), (1, 2)):
        geometry = {"STRIDE": s, "PAD": k // 2, "KH": k, "KW": k, **even}
        weights = [("", {}, {})]  # (label suffix, weight strides of 1, pointer dtypes)
        if kernel in ("conv_fwd_kernel", "conv_dgrad_kernel"):
            if k == 1:  # [K, C, 1, 1] as it is, or cast to the data dtype
                weights = [("", {"swc": 1, "swh": 1, "sww": 1}, {"w_ptr": param}),
                           (",w-cast", {"swc": 1, "swh": 1, "sww": 1}, {})]
            else:  # packed; small ones as they are, nn.Conv2d's layout or channels_last
                weights = [("", {"swk": 1} if kernel == "conv_fwd_kernel" else {"swc": 1}, {}),
                           (",w-nchw", {"sww": 1}, {"w_ptr": param}), (",w-nhwc", {"swc": 1}, {"w_ptr": param})]
        elif kernel == "conv_wgrad_kernel":  # the gradient of a contiguous weight
            weights = [("", {"spc": 1, "sph": 1, "spw": 1} if k == 1 else {"spw": 1}, {})]
        for suffix, weight, pointers in weights:
            if kernel == "conv_fwd_kernel":
                for res, emit in itertools.product((False, True), repeat=2):
                    yield (f"{k}x{k}/s{s}{'+res' if res else ''}{'+stats' if emit else ''}{suffix}",
                           {**geometry, **common, **weight, "HAS_RESIDUAL": res, "EMIT_STATS": emit}, pointers)
            elif kernel == "conv_dgrad_kernel":  # stride 2 in parity classes (triton_launch.DGRAD_PARITY)
                yield f"{k}x{k}/s{s}{suffix}", {**geometry, **common, **weight, "PARITY": s == 2}, pointers
                fin = {"FINALIZE": True, "TRAINING": True, "BLOCK_T": L.TAIL_T_DGRAD}
                if suffix == "" and (k, s) != (1, 2):  # with the BN-backward finalize in its last programs
                    yield f"{k}x{k}/s{s}+fin", {**geometry, **common, **weight, "PARITY": s == 2, **fin}, pointers
                if tma and s == 1 and (suffix == "" if k == 3 else suffix == ",w-cast"):  # through TMA descriptors
                    yield f"{k}x{k}/s{s}{suffix},tma", {**geometry, **common, **weight}, pointers
                    yield f"{k}x{k}/s{s}+fin{suffix},tma", {**geometry, **common, **weight, **fin}, pointers
            else:
                yield f"{k}x{k}/s{s}{suffix}", {**geometry, **common, **weight}, pointers
                if tma and s == 1:  # x and gy through TMA descriptors (dense rows)
                    yield f"{k}x{k}/s{s},tma", {**geometry, **common, **weight}, pointers
            if kernel == "conv_fwd_kernel" and tma and s == 1 and (suffix == "" if k == 3 else suffix == ",w-cast"):
                # read through TMA descriptors (sm_90; triton_launch._tma_forward):
                # the weight packed [KH*KW*C, K], or 1x1 [K, C] cast to x's dtype
                for res, emit in ((False, False), (True, True)):
                    yield (f"{k}x{k}/s{s}{'+res+stats' if res else ''}{suffix},tma",
                           {**geometry, **common, **weight, "HAS_RESIDUAL": res, "EMIT_STATS": emit,
                            "W_KC": k == 1}, pointers)
            if kernel in ("conv_fwd_kernel", "conv_wgrad_kernel") and (k == 3 and suffix == "" or k == 1 and s == 1):
                # reading an activation pass's output (ACT_PASS: its configs only; 3x3, and
                # 1x1 with many output channels, either weight form)
                extra = {"HAS_RESIDUAL": True, "EMIT_STATS": True} if kernel == "conv_fwd_kernel" else {}
                yield (f"{k}x{k}/s{s}{'+res+stats' if extra else ''}{suffix},act",
                       {**geometry, **common, **weight, **extra, "ACT_PASS": True}, pointers)
            if k == 3 and s == 1 and kernel == "conv_wgrad_kernel":
                # a kernel row's three taps a program (TAP_ROWS: its configs only), dense rows or not
                yield f"{k}x{k}/s{s},rows", {**geometry, **common, **weight, "TAP_ROWS": True}, pointers
                yield (f"{k}x{k}/s{s},general,rows", {**geometry, **common, **weight, "TAP_ROWS": True,
                                                      "DENSE_ROWS": False}, pointers)
            if k == 3 and s == 1 and suffix == "" and kernel != "conv_wgrad_kernel":
                # the taps' tiles copied through L1 (L1_TAPS: 8-byte cp.async.ca; every config)
                extra = {"HAS_RESIDUAL": True, "EMIT_STATS": True} if kernel == "conv_fwd_kernel" else {}
                extra |= {"PARITY": False} if kernel == "conv_dgrad_kernel" else {}
                yield (f"{k}x{k}/s{s}{'+res+stats' if extra.get('HAS_RESIDUAL') else ''},l1",
                       {**geometry, **common, **weight, **extra, "L1_TAPS": True}, pointers)
            if k == 3 and s == 1 and suffix == "":
                extra = {"HAS_RESIDUAL": False, "EMIT_STATS": False} if kernel == "conv_fwd_kernel" else {}
                extra |= {"PARITY": False} if kernel == "conv_dgrad_kernel" else {}
                # 64-bit offsets, for tensors of 2**30+ elements
                yield f"{k}x{k}/s{s},i64", {**geometry, **common, **weight, **extra, "WIDE_INDEX": True}, pointers
                yield (f"{k}x{k}/s{s},general", {**geometry, **common, **weight, **extra,
                                                 **{name: False for name in even}}, pointers)


def _configs(kernel: str, all_configs: bool):
    """(config, default?) pairs: every config the launcher can pick, or only
    those the model channel counts pick."""
    from . import triton_launch as L

    counts = (16, 32, 64, 128) if all_configs else MODEL_CHANNELS
    seen, defaults = {}, set()
    for cols, red in itertools.product(counts, repeat=2):
        if kernel == "conv_wgrad_kernel":
            configs = L._wgrad_configs(cols, red, tma=True, act_pass=int(red >= L.ACT_PASS_CHANNELS),
                                       tap_rows=int(red >= 64))
        else:  # every candidate: 3x3 (both loops, half-width tiles) and 1x1 (epilogue loads first),
            # the forward's 256-column tiles, the epilogue-heavy dgrads' forms
            wide = kernel == "conv_fwd_kernel"
            tma = "forward" if wide else "dgrad"
            configs = (L._gemm_configs(L.ROWS_GPU, cols, red, taps=9, small_grid=True, wide=wide, tma=tma,
                                       act_pass=int(wide and red >= L.ACT_PASS_CHANNELS),
                                       two_per_sm=3 if wide else 4)
                       + L._gemm_configs(L.ROWS_GPU, cols, red, taps=1, small_grid=True, epilogue_tile=True,
                                         wide=wide, epilogue_heavy=kernel == "conv_dgrad_kernel", tma=tma,
                                         act_pass=int(wide and red >= L.ACT_PASS_CHANNELS
                                                      and L._cdiv(cols, 128) >= L.ACT_PASS_READS)))
        for cfg in configs:
            key = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages, cfg.maxnreg)
            seen.setdefault(key, cfg)
            if cols in MODEL_CHANNELS and red in MODEL_CHANNELS:
                defaults.add(key)
    for key, cfg in seen.items():
        yield cfg, key in defaults


def _small_kernels(dtype: str):
    """The reductions, the elementwise kernel and the weight's pack, at
    their launch configs (the per-channel merges at triton_launch.MERGE_T x
    MERGE_C): (kernel, variant, constexprs, warps[, pointer dtypes])."""
    from . import triton_launch as L

    fp64 = _TYPE.get(dtype, dtype) == "fp64"
    merge = {"BLOCK_T": L.MERGE_T, "BLOCK_C": L.MERGE_C}
    for bc in (16, 32, 64):
        yield "channel_stats_partial_kernel", "", {"BLOCK_M": 256, "BLOCK_C": bc, "IS_FP64": fp64}, 4
        if bc <= 32:  # with bn_finalize's work in its last programs (batch statistics, running update, count)
            yield ("channel_stats_partial_kernel", "+fin",
                   {"BLOCK_M": 256, "BLOCK_C": bc, "IS_FP64": fp64, "FINALIZE": True, "UPDATE_RUNNING": True,
                    "HAS_GAMMA": True, "HAS_BETA": True, "COUNT_BATCH": True, "BLOCK_T": L.TAIL_T_STATS}, 4)
        yield "activation_pass_kernel", "", {"BLOCK_M": 128, "BLOCK_C": bc, "IS_FP64": fp64}, 4
        # The library GEMM route's: the forward's moments in the epilogue's tiles, the dgrad's epilogue.
        if bc <= 32:
            yield ("channel_stats_partial_kernel", "stats-rows",
                   {"BLOCK_M": L.ROWS_GPU, "BLOCK_C": bc, "IS_FP64": fp64}, 4)
            yield ("relu_backward_partials_kernel", "", {"BLOCK_M": L.RELU_BACKWARD_ROWS, "BLOCK_C": bc,
                                                         "IS_FP64": fp64}, 4, {"ga_ptr": _TYPE.get(dtype, dtype)})
        for training in (False, True):
            yield ("bn_grad_input_kernel", "train" if training else "eval",
                   {"TRAINING": training, "IS_FP64": fp64, "BLOCK_M": 128, "BLOCK_C": bc}, 4)
    yield "merge_stats_kernel", "", {**merge, "IS_FP64": fp64}, 4
    for training in (False, True):
        yield "bn_backward_finalize_kernel", "train" if training else "eval", {"TRAINING": training, **merge}, 4
    for partials, batch, update in ((True, True, True), (False, True, True), (False, False, False)):
        yield ("bn_finalize_kernel", f"{'partials' if partials else 'moments'}"
               f"{'' if batch else ',eval'}{',update,count' if update else ''}",
               {"FROM_PARTIALS": partials, "BATCH_STATS": batch, "UPDATE_RUNNING": update, "HAS_GAMMA": True,
                "HAS_BETA": True, "COUNT_BATCH": update, **merge, "IS_FP64": fp64}, 4)
    # The weight gradient's split sum: fp32 (fp64) partials into the fp32 weight, in the blocks
    # triton_launch._split_sum_blocks picks (8 to 1024 columns: the more elements, the wider).
    for block_n, block_s in ((1024, 8), (256, 32), (128, 2), (128, 16), (128, 64), (32, 128), (16, 256), (8, 256)):
        yield "split_sum_kernel", f"{block_n}x(splits<={block_s})", {"BLOCK_S": block_s, "BLOCK_N": block_n}, 4
    # The forward's packed 3x3 weight from an fp32 (fp64) channels_last one (C, its rows here, innermost).
    param = "fp64" if fp64 else "fp32"
    yield ("pack_weight_kernel", "", {"ssa": 1, "BLOCK_A": L.PACK_BLOCK, "BLOCK_B": L.PACK_BLOCK}, 4,
           {"src_ptr": param, "dst_ptr": _TYPE.get(dtype, dtype)})


def _jobs(dtypes, all_configs: bool, first_only: bool = False, tma: bool = True) -> list[tuple]:
    """(kernel, dtype, variant, constexprs, warps, stages, default?, pointer dtypes) to compile.
    Every config of each GEMM kernel with its heaviest variants (3x3, stride 1,
    residual and statistics epilogue; 1x1 with a cast weight, the long
    reductions; the stride-2 dgrad's parity classes), the first config with every other
    variant; the configs that load the epilogue's tile first (1x1 only) with
    the 1x1 stride-1 variants instead (with the residual, for the forward);
    the forward's 256-column tiles with both (1x1 with a short reduction
    reads the fp32 weight as it is);
    the TMA configs of the forward and dgrad with their TMA variants
    (``,tma``), both only where ``tma`` (sm_90);
    ``first_only``: the first config of each variant; ``all_configs``:
    every config with every variant."""
    jobs = []
    for dtype in dtypes:
        for kernel in ("conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel"):
            configs = list(_configs(kernel, all_configs))
            for i, (variant, constexprs, pointers) in enumerate(_variants(kernel, dtype)):
                # _variants yields the 3x3/s1 variants first; the last of
                # those for conv_fwd is the one with residual and statistics.
                # The stride-2 dgrad is another loop (parity classes): every config too.
                # The dgrads with the finalize tail: every config too (the tail
                # comes after the GEMM; its registers must not spill the loop's).
                heaviest = (variant in ("3x3/s1", "3x3/s1+res+stats", "1x1/s1,w-cast", "1x1/s1+res+stats,w-cast")
                            or variant.endswith(",l1")
                            or (kernel == "conv_dgrad_kernel" and (variant == "3x3/s2" or variant.endswith("+fin"))))
                # (short reductions: never the cast weight, which is for long ones)
                short = variant in ("1x1/s1", "1x1/s1+res+stats", "1x1/s1+fin")
                for j, (cfg, default) in enumerate(configs):
                    first = cfg.kwargs.get("EPILOGUE_FIRST", False)
                    if variant.endswith(",act") or cfg.kwargs.get("ACT_PASS"):
                        # every ACT_PASS config with the ACT_PASS variants: the forward's
                        # 3x3 ones both loops (unrolled at 3 stages), its 1x1 ones unrolled
                        # (triton_launch._act_pass_configs)
                        loop_ok = (kernel != "conv_fwd_kernel" or (
                            (cfg.kwargs["FLAT"] or cfg.num_stages == 3 and cfg.kwargs["BLOCK_N"] < 256)
                            if variant.startswith("3x3") else not cfg.kwargs["FLAT"]))
                        take = variant.endswith(",act") and bool(cfg.kwargs.get("ACT_PASS")) and loop_ok
                    elif variant.endswith(",rows") or cfg.kwargs.get("TAP_ROWS"):
                        # the weight gradient's kernel-row form: its configs with its variants only
                        take = variant.endswith(",rows") and bool(cfg.kwargs.get("TAP_ROWS"))
                    elif variant.endswith(",tma") or cfg.kwargs.get("TMA"):
                        # every TMA config with the TMA variants, the forward's
                        # with its epilogue's residual and statistics only (the
                        # plain ones with the first); the register limit is
                        # for the 3x3 ones (triton_launch._gemm_configs)
                        plain_fwd = kernel == "conv_fwd_kernel" and "+res" not in variant
                        take = (tma and variant.endswith(",tma") and bool(cfg.kwargs.get("TMA"))
                                and not (variant.startswith("1x1") and cfg.maxnreg)
                                and (all_configs or not plain_fwd
                                     or cfg is next(c for c, _ in configs if c.kwargs.get("TMA"))))
                    elif cfg.kwargs["BLOCK_N"] == 256:  # forward only: flat 3x3, 1x1, with launchable variants
                        take = (cfg.kwargs["FLAT"] == variant.startswith("3x3")
                                and (all_configs or (not first_only and (short or heaviest))))
                    else:
                        take = all_configs or j == 0 or (not first_only and (short if first else heaviest))
                        if cfg.maxnreg and cfg.kwargs["FLAT"]:
                            # the two-per-SM twins (triton_launch._two_per_sm_configs): the
                            # flat 3x3 loops only, never launched with a weight read as it is,
                            # 64-bit offsets or the stride-2 dgrad's parity classes
                            take = take and variant.startswith("3x3") and not constexprs.get("PARITY") and not any(
                                tag in variant for tag in (",w-nchw", ",w-nhwc", ",i64"))
                    if take:
                        limit = {"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}
                        jobs.append((kernel, dtype, variant, {**constexprs, **cfg.kwargs, **limit}, cfg.num_warps,
                                     cfg.num_stages, default, pointers))
        for kernel, variant, constexprs, warps, *pointers in _small_kernels(dtype):
            jobs.append((kernel, dtype, variant, constexprs, warps, 3, True, pointers[0] if pointers else {}))
    return jobs


def _compile(arch: int, job: tuple):
    """Triton's CompiledKernel of one job (see ``_jobs``) for sm_``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_kernels as K

    kernel, dtype, variant, constexprs, warps, stages, default, pointers = job
    constexprs = dict(constexprs)
    maxnreg = constexprs.pop("maxnreg", None)  # a config's register limit (triton.Config.maxnreg)
    fn = getattr(K, kernel)
    sig, attrs, consts = _specialize(fn, _TYPE.get(dtype, dtype), constexprs, pointers)
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages,
                                   **({"maxnreg": maxnreg} if maxnreg else {})})


def compile_ptx(arch: int, job: tuple) -> str:
    """The PTX of one job (see ``_jobs``) for sm_``arch``."""
    return _compile(arch, job).asm["ptx"]


def _compile_one(arch: int, job: tuple) -> Compiled:
    kernel, dtype, variant, constexprs, warps, stages, default, pointers = job
    constexprs = dict(constexprs)
    maxnreg = constexprs.pop("maxnreg", None)  # a config's register limit (triton.Config.maxnreg)
    cfg_label = ",".join(f"{k}={v}" for k, v in constexprs.items()
                         if k.startswith(("BLOCK", "GROUP", "FLAT", "CHANNEL_ROWS", "EPILOGUE", "TMA")))
    limit = f",maxnreg={maxnreg}" if maxnreg else ""
    rec = Compiled(kernel, arch, dtype, variant, f"{cfg_label},warps={warps},stages={stages}{limit}", default)
    t0 = time.time()
    try:
        compiled = _compile(arch, job)
        rec.registers, rec.spill_bytes = _resources(compiled.asm["cubin"])
        if kernel.startswith("conv_"):
            rec.loop_instructions, rec.loop_mmas = _cached(_mainloop, compiled.asm["cubin"],
                                                           sources=(_mainloop_of_sass,))
        rec.shared_bytes = int(compiled.metadata.shared)
        rec.wgmma = "wgmma" in compiled.asm.get("ptx", "")
        pendings = [int(p) for p in re.findall(r"pendings = (\d+)", compiled.asm.get("ttgir", ""))]
        rec.wgmma_pending = max(pendings) if pendings and rec.wgmma else -1
        if rec.wgmma and arch >= 90:
            rec.serialized = _cached(_serialized, compiled.asm["ptx"], arch)
    except Exception as exc:  # noqa: BLE001  (reported, and the exit status says so)
        rec.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    rec.seconds = time.time() - t0
    return rec


def compile_all(archs, dtypes, all_configs: bool, jobs: int = 1, progress: bool = True,
                one_per_kernel: bool = False) -> list[Compiled]:
    """Compile the jobs of ``_jobs`` for each arch; ``one_per_kernel``: only
    each kernel's first job per arch and dtype (a quick check that a dtype
    builds at all)."""
    import concurrent.futures as cf
    import multiprocessing

    from tqdm import tqdm

    # Before sm_90 (no wgmma, no spill check) the first config of each variant
    # is compiled, as a check that the kernels build there (sm_80).
    work = [(arch, job) for arch in archs for job in _jobs(dtypes, all_configs, first_only=arch < 90, tma=arch >= 90)]
    if one_per_kernel:
        firsts = {}
        for arch, job in work:
            firsts.setdefault((arch, job[0], job[1]), (arch, job))
        work = list(firsts.values())
    results = []
    with tqdm(total=len(work), desc="AOT compile", disable=not progress) as bar:
        if jobs <= 1:
            for arch, job in work:
                results.append(_compile_one(arch, job))
                bar.update(1)
        else:
            with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                for rec in pool.map(_compile_one, *zip(*work)):
                    results.append(rec)
                    bar.update(1)
    return results


def _mma_rows(r: Compiled) -> int:
    """Rows of the kernel's tl.dot (wgmma needs 64 per warpgroup): the pixel
    block for forward/dgrad, the output-channel block for wgrad."""
    key = "BLOCK_N" if r.kernel == "conv_wgrad_kernel" else "BLOCK_M"
    return int(re.search(key + r"=(\d+)", r.config).group(1))


def problems(results: list[Compiled]) -> list[str]:
    out = []
    for r in results:
        where = f"{r.kernel} {r.dtype} {r.variant} [{r.config}] sm_{r.arch}"
        if r.error:
            out.append(f"compile failed: {where}: {r.error}")
        elif r.arch >= 90 and r.default and r.spill_bytes > 0:
            out.append(f"default config spills {r.spill_bytes} bytes: {where}")
        elif (r.arch == 90 and r.dtype in ("float16", "bfloat16") and r.kernel.startswith("conv_")
              and _mma_rows(r) >= 64 and not r.wgmma):
            out.append(f"no wgmma: {where}")
        elif r.arch >= 90 and r.default and r.serialized:
            out.append(f"ptxas serializes the wgmmas ({r.serialized}): {where}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32"], choices=list(_TYPE))
    parser.add_argument("--all-configs", action="store_true",
                        help="every config the launchers can pick (default: those the model shapes pick)")
    parser.add_argument("--json", help="write every record here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--one-per-kernel", action="store_true",
                        help="only each kernel's first variant and config per arch and dtype (does the dtype build?)")
    parser.add_argument("--fail-on", choices=["all", "serialized"], default="all",
                        help="which problems set the exit status (serialized: serialized wgmmas and compile "
                             "failures, not spills or missing wgmma; those are still printed)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: ahead-of-time compile needs JIT kernels", file=sys.stderr)
        return 2
    results = compile_all(args.arch, args.dtype, args.all_configs, jobs=args.jobs, progress=not args.no_progress,
                          one_per_kernel=args.one_per_kernel)
    if args.json:
        with open(args.json, "w") as f:
            # one record a line: reports regenerated after a change diff line by line
            f.write("[\n" + ",\n".join(json.dumps(asdict(r), separators=(",", ":")) for r in results) + "\n]\n")
    # Compact summary: per kernel/arch/dtype, the worst registers/spills/shared;
    # wgmma: compiles that use it; sync: those of them whose TTGIR waits for
    # every wgmma before the next step (wgmma_pending 0); ser: those whose
    # wgmmas ptxas serializes (which ones, and why: --json).
    print(f"{'kernel':30} {'arch':>4} {'dtype':>9} {'n':>4} {'max REG':>7} {'spilling':>8} "
          f"{'max smem':>8} {'wgmma':>6} {'sync':>5} {'ser':>4} {'s':>6}")
    key = lambda r: (r.kernel, r.arch, r.dtype)  # noqa: E731
    for (kernel, arch, dtype), group in itertools.groupby(sorted(results, key=key), key=key):
        group = [r for r in group if not r.error]
        if not group:
            continue
        print(f"{kernel:30} {arch:>4} {dtype:>9} {len(group):>4} {max(r.registers for r in group):>7} "
              f"{sum(r.spill_bytes > 0 for r in group):>8} {max(r.shared_bytes for r in group):>8} "
              f"{sum(r.wgmma for r in group):>6} {sum(r.wgmma_pending == 0 for r in group):>5} "
              f"{sum(bool(r.serialized) for r in group):>4} {sum(r.seconds for r in group):>6.1f}")
    bad = problems(results)
    for line in bad:
        print("PROBLEM:", line)
    print(f"{len(results)} compiles, {len(bad)} problem(s)")
    return 1 if failing(bad, args.fail_on) else 0


def failing(bad: list[str], fail_on: str) -> list[str]:
    """The problems that fail the run: all, or (``serialized``) serialized
    wgmmas and compile failures only."""
    return bad if fail_on == "all" else [line for line in bad if line.startswith(("ptxas serializes",
                                                                                  "compile failed"))]


if __name__ == "__main__":
    sys.exit(main())
