"""Scoring functions of calibprune's offline generative lm-eval tasks (``process_results(doc, results)``).

They replace the hub-bound scorers of the standard tasks (``evaluate.load("code_eval")``, ``math_verify``):

- GSM8K: strict ``#### <number>`` extraction from the generation, compared to the reference number after removing
  ``,``, ``$`` and a trailing ``.`` (lm-eval's ``strict-match`` filter and ``exact_match`` settings);
- MATH: the last ``\\boxed{...}`` of the generation vs the reference solution's, after light normalisation
  (spaces, ``\\left``/``\\right``, ``\\!``, ``dfrac``/``tfrac`` -> ``frac``, surrounding ``$``): a string
  match, stricter than minerva_math's sympy equivalence;
- HumanEval / MBPP: greedy pass@1 by running the program with its tests in a fresh Python subprocess with a
  timeout. This executes model-generated code: ``evaluate(..., allow_code_execution=True)`` is required.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "CODE_TIMEOUT_S",
    "extract_boxed",
    "gsm8k_process_results",
    "humaneval_process_results",
    "math_process_results",
    "mbpp_process_results",
    "normalize_math_answer",
    "run_python",
]

CODE_TIMEOUT_S = 10.0
_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")


def _gsm8k_number(text: str) -> str | None:
    m = _GSM8K_STRICT.search(text)
    if m is None:
        return None
    return re.sub(r"\.$", "", m.group(1).replace(",", "").replace("$", "")).strip()


def gsm8k_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """``{"exact_match": 0 | 1}``: the first ``#### n`` of the generation equals the reference's."""
    pred = _gsm8k_number(results[0])
    gold = _gsm8k_number(doc["answer"])
    return {"exact_match": int(pred is not None and pred == gold)}


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces; ``None`` if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def normalize_math_answer(ans: str) -> str:
    """Light normalisation of a MATH answer string before exact comparison."""
    s = ans.strip().strip("$")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("dfrac", "frac"),
                     ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def math_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """``{"exact_match": 0 | 1}``: the generation's last boxed answer equals the reference's after normalisation."""
    pred = extract_boxed(results[0])
    gold = extract_boxed(doc["solution"])
    ok = pred is not None and gold is not None and normalize_math_answer(pred) == normalize_math_answer(gold)
    return {"exact_match": int(ok)}


def run_python(program: str, *, timeout: float = CODE_TIMEOUT_S) -> bool:
    """Run ``program`` in a fresh ``python -I`` subprocess in a temporary directory; True when it exits 0."""
    if os.environ.get("CALIBPRUNE_ALLOW_CODE_EXECUTION") != "1":
        raise RuntimeError("executing model-generated code was not allowed: pass allow_code_execution=True to "
                           "calibprune.evaluate (it sets CALIBPRUNE_ALLOW_CODE_EXECUTION=1 for the run)")
    with tempfile.TemporaryDirectory(prefix="calibprune-exec-") as tmp:
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", program], cwd=tmp, timeout=timeout,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0


def humaneval_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """``{"pass@1": 0 | 1}``: prompt + completion + the task's tests + ``check(entry_point)`` pass."""
    program = f"{doc['prompt']}{results[0]}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"
    return {"pass@1": int(run_python(program))}


def mbpp_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """``{"pass@1": 0 | 1}``: the generated code (up to ``[DONE]``) passes all of the task's asserts."""
    code = results[0].split("[DONE]")[0]
    program = "\n".join([doc.get("test_setup_code") or "", code, *doc["test_list"]]) + "\n"
    return {"pass@1": int(run_python(program))}
