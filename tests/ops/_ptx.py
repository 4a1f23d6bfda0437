"""Compile calibprune's Triton kernels ahead of time for a GPU target, without a GPU, and return their TTIR/PTX.

Triton can lower a kernel to PTX for any NVIDIA target on a machine without a GPU (it ships ptxas). The test session
runs Triton interpreted on CPU (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``), where ``@triton.jit`` yields
interpreter objects that cannot be compiled; so the compilation runs in a fresh Python process with the interpreter
off, once per session, and hands back the assembly as JSON. Each kernel is compiled exactly as its launcher launches
it: the launcher's constexprs, ``num_warps`` and launch options (``kernels.obs.LAUNCH_OPTIONS``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent('''
    import json, sys, traceback
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from calibprune.kernels import hessian as kh, obs as ko

    arch = int(sys.argv[1])
    target = GPUTarget("cuda", arch, 32)
    out = {"triton": triton.__version__, "kernels": {}}

    def compile_one(name, fn, signature, constexprs, options):
        try:
            k = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=target, options=options)
            out["kernels"][name] = {"ttir": k.asm["ttir"], "ptx": k.asm["ptx"], "options": options}
        except Exception:
            out["kernels"][name] = {"error": traceback.format_exc()}

    obs_sig = {"W_ptr": "*fp32", "U_ptr": "*fp32", "Err_ptr": "*fp32", "Mask_ptr": "*u8", "Thresh_ptr": "*fp32",
               "rows": "i32", "count": "i32", "stride_w": "i32", "stride_u": "i32", "stride_e": "i32",
               "stride_m": "i32", "PRUNE_N": "constexpr", "GROUP": "constexpr", "BLOCK_R": "constexpr",
               "BLOCK_C": "constexpr"}
    for label, n, m in (("unstructured", 0, 1), ("2:4", 2, 4)):
        block_r, block_c, num_warps = ko.launch_config(128, interpreted=False)
        compile_one(f"obs[{label}]", ko._obs_block_kernel, obs_sig,
                    {"PRUNE_N": n, "GROUP": m, "BLOCK_R": block_r, "BLOCK_C": block_c},
                    {"num_warps": num_warps, **ko.LAUNCH_OPTIONS})

    hess = kh._hessian_syrk_kernel.fn  # the JITFunction under the autotuner
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        cfg = kh._GPU_CONFIGS[-1]
        sig = {"H_ptr": "*fp32", "X_ptr": f"*{dtype}", "tokens": "i32", "d": "i32", "stride_h": "i32",
               "stride_x": "i32", "beta": "fp32", "alpha": "fp32", "IN_DTYPE": "constexpr",
               "PRECISION": "constexpr", "UPCAST": "constexpr", "UPPER_ONLY": "constexpr",
               "BLOCK_D": "constexpr", "BLOCK_T": "constexpr"}
        compile_one(f"hessian[{dtype}]", hess, sig,
                    {"IN_DTYPE": dtype, "PRECISION": precision, "UPCAST": False, "UPPER_ONLY": False,
                     **cfg.kwargs},
                    {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    json.dump(out, sys.stdout)
''')


def compile_kernels(arch: int = 90, timeout: float = 600) -> dict:
    """``{"triton": version, "kernels": {name: {"ttir", "ptx", "options"} | {"error"}}}`` for target sm_``arch``.

    Raises ``RuntimeError`` with the child's stderr when the compile process itself fails.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's historical default, stated so it does not warn
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(arch)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the Triton kernels for sm_{arch} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)
