"""The Triton kernels as a GPU would run them: compiled for sm_90 on this CPU machine, their TTIR/PTX inspected.

* OBS (``kernels/obs.py``): every fp32 division is IEEE round-to-nearest (``div.rn.f32``), never ``div.full.f32``
  or ``div.approx``; no fused multiply-add anywhere in the kernel (the reference rounds the rank-1 product and the
  subtraction separately), and the products and subtractions carry an explicit ``.rn`` so ptxas cannot contract them.
* Hessian (``kernels/hessian.py``): every pointer offset is 64-bit (X reaches 2³¹ elements at 128×2048 tokens of a
  14336-wide layer), and the PTX forms addresses from 64-bit products.

Skipped, with the reason, when Triton cannot compile for sm_90 here.
"""
from __future__ import annotations

import re

import pytest

from ._ptx import compile_kernels

pytestmark = pytest.mark.slow

_ADDPTR = re.compile(r"tt\.addptr\b.*:\s*(\S+),\s*(tensor<[^>]*?x?(i\d+)>|(i\d+))\s*(loc\(.*\))?$")


@pytest.fixture(scope="module")
def sm90() -> dict:
    pytest.importorskip("triton")
    try:
        compiled = compile_kernels(90)
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"Triton cannot compile for sm_90 on this machine: {str(exc)[-500:]}")
    errors = {k: v["error"] for k, v in compiled["kernels"].items() if "error" in v}
    if errors and len(errors) == len(compiled["kernels"]):
        pytest.skip(f"Triton {compiled['triton']} cannot compile for sm_90 here: {next(iter(errors.values()))[-500:]}")
    return compiled["kernels"]


def _kernel(sm90: dict, name: str) -> dict:
    entry = sm90[name]
    assert "error" not in entry, f"{name} failed to compile for sm_90:\n{entry['error']}"
    return entry


def _lines(text: str, pattern: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if re.search(pattern, ln)]


def _offset_types(ttir: str) -> list[str]:
    """Element type of the offset operand of every ``tt.addptr`` in the TTIR."""
    types = []
    for ln in _lines(ttir, r"tt\.addptr\b"):
        m = _ADDPTR.search(ln)
        assert m, f"unparsed tt.addptr line: {ln}"
        types.append(m.group(3) or m.group(4))
    return types


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_obs_divides_ieee(sm90, pattern):
    ptx = _kernel(sm90, f"obs[{pattern}]")["ptx"]
    approx = _lines(ptx, r"\bdiv\.(full|approx)(\.ftz)?\.f32\b") + _lines(ptx, r"\brcp\.approx")
    assert not approx, f"approximate division in the OBS kernel ({len(approx)}), e.g. {approx[:3]}"
    assert _lines(ptx, r"\bdiv\.rn\.f32\b"), "no IEEE division (div.rn.f32) found: did the scores move elsewhere?"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_obs_never_fuses_multiply_add(sm90, pattern):
    entry = _kernel(sm90, f"obs[{pattern}]")
    ptx = entry["ptx"]
    assert entry["options"].get("enable_fp_fusion") is False, "the OBS launch options must disable FP fusion"
    fma = _lines(ptx, r"\bfma\.(rn|rz|rm|rp)?\.?(ftz\.)?f32\b") + _lines(ptx, r"\bmad\.(rn\.)?f32\b")
    assert not fma, f"fused multiply-add in the OBS kernel ({len(fma)}), e.g. {fma[:3]}"
    # The rank-1 update: rounded products and rounded subtractions (or additions of a negated product), each with an
    # explicit rounding mode so that ptxas may not contract them either.
    assert _lines(ptx, r"\bmul\.rn\.f32\b"), "no explicitly rounded fp32 product (mul.rn.f32)"
    assert _lines(ptx, r"\b(sub|add)\.rn\.f32\b"), "no explicitly rounded fp32 subtraction (sub.rn/add.rn.f32)"
    loose = _lines(ptx, r"\b(mul|sub|add)\.f32\b")
    assert not loose, f"fp32 arithmetic without a rounding mode, contractible by ptxas: {loose[:3]}"


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_hessian_offsets_are_64_bit(sm90, dtype):
    entry = _kernel(sm90, f"hessian[{dtype}]")
    types = _offset_types(entry["ttir"])
    assert types, "no pointer arithmetic found in the Hessian kernel's TTIR"
    narrow = [t for t in types if t != "i64"]
    assert not narrow, f"{len(narrow)} of {len(types)} pointer offsets in the Hessian kernel are not 64-bit: {narrow}"
    ptx = entry["ptx"]
    # Products that form addresses: 64-bit (mul.lo.s64 / mul.wide) — no 32-bit multiply feeds a 64-bit address.
    assert _lines(ptx, r"\bmul\.(lo\.s64|wide\.[su]32)\b"), "no 64-bit address products in the Hessian PTX"


def test_obs_row_offsets_are_64_bit(sm90):
    """Row terms (row·stride, a [BLOCK_R, 1] offset) and U's row offsets (a scalar) are 64-bit; Triton adds the
    column term (< BLOCK_C) separately in 32 bits, which cannot overflow."""
    ttir = _kernel(sm90, "obs[unstructured]")["ttir"]
    rows = [ln for ln in _lines(ttir, r"tt\.addptr\b") if re.search(r"tensor<\d+x1xi\d+>|!tt\.ptr<f32>, i\d+", ln)]
    assert rows, "no row-offset pointer arithmetic found in the OBS kernel's TTIR"
    narrow = [ln for ln in rows if not re.search(r"tensor<\d+x1xi64>|!tt\.ptr<f32>, i64", ln)]
    assert not narrow, f"32-bit row offsets in the OBS kernel: {narrow[:2]}"
