"""Benchmark registry: which offline file each benchmark reads, how a record becomes a document, which metric.

Every benchmark belongs to one capability dimension (ARCHITECTURE.md) and is one of three kinds:

- ``"lm_eval"``: an lm-evaluation-harness task. Offline, the records are converted to a flat JSONL (one document
  per line, final prompt strings precomputed) and a YAML config ``calibprune_<name>`` that reads it with
  ``dataset_path: json`` is rendered into a temporary folder for ``lm_eval.tasks.TaskManager(include_path=...)``;
  with the hub, the standard lm-eval task (``hub_task``) is used instead.
- ``"proxy"``: mean NLL per token of held-out reference solutions given their prompts (``proxies.py``); the Code
  and Math likelihood proxies for models that score ~0 on the generative tasks.
- ``"perplexity"``: WikiText-2 raw test perplexity (``perplexity.py``).

Converted document schemas (what the tests check):

- multiple choice: ``{query: str, choices: list[str], gold: int}`` (WinoGrande, partial scoring:
  ``{options: list[str], continuation: str, gold: int}``; the option-filled prefixes are the contexts);
- LAMBADA: ``{context: str, target: str}`` (``target`` starts with a space);
- generative / proxy: ``{prompt: str, solution: str, ...}`` plus what the scorer needs (tests, entry point).

Splits: only evaluation splits are read (MBPP task ids 11-510, GSM8K ``test.jsonl``); few-shot examples come from
the non-test slices (MMLU ``dev``, GSM8K ``train``, MBPP prompt ids 1-10), never from the test documents.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..calibration.sources import DIMENSIONS  # the one definition of the capability dimensions

log = logging.getLogger(__name__)

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "DIMENSIONS",
    "TASK_PREFIX",
    "load_docs",
    "render_lm_eval_task",
]

TASK_PREFIX = "calibprune_"
MBPP_TEST_IDS = range(11, 511)  # standard MBPP test task ids (the shared copy holds 11-310)
MBPP_PROMPT_IDS = range(1, 11)  # the standard few-shot prompt tasks
MMLU_CHOICE_LABELS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of a capability dimension.

    ``files`` are relative to the offline data dir; ``metric`` is the lm-eval metric name (``acc``, ``acc_norm``,
    ``exact_match``, ``pass@1``) or ``nll`` / ``perplexity``; ``hub_task`` / ``hub_metric`` name the standard
    lm-eval task and its result key used with ``offline=False``.
    """

    name: str
    dimension: str
    kind: str  # "lm_eval" | "proxy" | "perplexity"
    metric: str
    higher_is_better: bool
    files: tuple[str, ...]
    description: str
    hub_task: str | None = None
    hub_metric: str | None = None
    generative: bool = False
    executes_code: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # defaults of the per-benchmark knobs

    def __post_init__(self) -> None:
        if self.dimension not in DIMENSIONS:
            raise ValueError(f"benchmark {self.name!r}: dimension {self.dimension!r} is not one of {DIMENSIONS}")
        if self.kind not in ("lm_eval", "proxy", "perplexity"):
            raise ValueError(f"benchmark {self.name!r}: unknown kind {self.kind!r}")

    @property
    def task_name(self) -> str:
        """The lm-eval task name of the rendered offline config."""
        return TASK_PREFIX + self.name


# ---------------------------------------------------------------------------------------------------------------
# Offline readers: files -> converted documents (see the module docstring for the schemas)
# ---------------------------------------------------------------------------------------------------------------


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _mmlu_format(question: str, choices: list[str]) -> str:
    lines = [question.strip()] + [f"{label}. {c}" for label, c in zip(MMLU_CHOICE_LABELS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu_rows(path: Path) -> list[tuple[str, list[str], int]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return [(r["question"], [r[f"choice{i}"] for i in range(4)], int(r["answer"])) for r in reader]


def _docs_mmlu(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    """MMLU test, subjects interleaved round-robin so that any prefix spans all subjects.

    ``num_fewshot`` > 0 puts that many examples of the *same subject's* dev split (with answers) before each
    question, as in the original MMLU protocol; the header names the subject.
    """
    test_dir, dev_dir = paths
    shots = int(options.get("num_fewshot", 0))
    per_subject: list[list[dict[str, Any]]] = []
    for test_file in sorted(test_dir.glob("*_test.csv")):
        subject = test_file.name.removesuffix("_test.csv")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prefix = header
        if shots:
            dev = _mmlu_rows(dev_dir / f"{subject}_dev.csv")[:shots]
            prefix += "".join(f"{_mmlu_format(q, c)} {MMLU_CHOICE_LABELS[a]}\n\n" for q, c, a in dev)
        per_subject.append([
            {"query": prefix + _mmlu_format(q, c), "choices": list(MMLU_CHOICE_LABELS), "gold": a, "subject": subject}
            for q, c, a in _mmlu_rows(test_file)
        ])
    docs: list[dict[str, Any]] = []
    for i in range(max((len(s) for s in per_subject), default=0)):
        docs.extend(s[i] for s in per_subject if i < len(s))
    return docs


def _docs_mmlu_cloze(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    """MMLU test in cloze form (the answer texts are the choices, as lm-eval's ``mmlu_continuation``), subjects
    interleaved as in :func:`_docs_mmlu`. Small models that cannot map letters to answers are above chance here."""
    test_dir = paths[0]
    per_subject: list[list[dict[str, Any]]] = []
    for test_file in sorted(test_dir.glob("*_test.csv")):
        subject = test_file.name.removesuffix("_test.csv")
        header = f"The following are questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        per_subject.append([{"query": f"{header}Question: {q.strip()}\nAnswer:", "choices": [str(x) for x in c],
                             "gold": a, "subject": subject} for q, c, a in _mmlu_rows(test_file)])
    docs: list[dict[str, Any]] = []
    for i in range(max((len(s) for s in per_subject), default=0)):
        docs.extend(s[i] for s in per_subject if i < len(s))
    return docs


def _docs_lambada(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"context": r["context"], "target": " " + r["continuation"].strip()} for r in _jsonl(paths[0])]


def _docs_hellaswag(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    """llama.cpp text layout: 6 lines per task (``activity_label: ctx``, gold 0-3, four endings)."""
    with bz2.open(paths[0], "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if len(lines) % 6 == 1 and not lines[-1].strip():
        lines = lines[:-1]
    if len(lines) % 6:
        raise ValueError(f"{paths[0]}: {len(lines)} lines is not a multiple of 6 (the 6-lines-per-task layout)")
    return [{"query": lines[i], "choices": lines[i + 2 : i + 6], "gold": int(lines[i + 1])}
            for i in range(0, len(lines), 6)]


def _docs_piqa(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    records = list(_jsonl(paths[0]))
    labels = [int(x) for x in paths[1].read_text(encoding="utf-8").split()]
    if len(labels) != len(records):
        raise ValueError(f"PIQA: {paths[0]} has {len(records)} records but {paths[1]} has {len(labels)} labels")
    return [{"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": lab}
            for r, lab in zip(records, labels)]


def _docs_foundry_qa(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    """llm-foundry ``{query, choices, gold}`` whose query is ``Question: ...`` (ARC) or a passage (BoolQ)."""
    return [{"query": r["query"].rstrip() + "\nAnswer:", "choices": list(r["choices"]), "gold": int(r["gold"])}
            for r in _jsonl(paths[0])]


def _docs_openbookqa(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    """llm-foundry ``{query, choices, gold}``; the query is the bare question stem, as in lm-eval openbookqa."""
    return [{"query": r["query"].strip(), "choices": list(r["choices"]), "gold": int(r["gold"])}
            for r in _jsonl(paths[0])]


def _docs_winogrande(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"options": list(r["context_options"]), "continuation": r["continuation"].strip(), "gold": int(r["gold"])}
            for r in _jsonl(paths[0])]


def _docs_humaneval(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"task_id": r["task_id"], "prompt": r["prompt"], "solution": r["canonical_solution"],
             "test": r["test"], "entry_point": r["entry_point"]} for r in _jsonl(paths[0])]


def _mbpp_prompt(rec: dict[str, Any]) -> str:
    tests = "\n".join(rec["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {rec['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def _docs_mbpp(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    """MBPP test task ids 11-510 only; the prompt is lm-eval's (task text + the three tests + ``[BEGIN]``)."""
    return [{"task_id": int(r["task_id"]), "prompt": _mbpp_prompt(r), "solution": r["code"].replace("\r\n", "\n"),
             "test_setup_code": r.get("test_setup_code", ""), "test_list": list(r["test_list"])}
            for r in _jsonl(paths[0]) if int(r["task_id"]) in MBPP_TEST_IDS]


def mbpp_fewshot_docs(path: Path) -> list[dict[str, Any]]:
    """MBPP prompt tasks 2-4, the standard 3-shot examples (task id 1 is skipped as in lm-eval / the paper)."""
    return [{"task_id": int(r["task_id"]), "prompt": _mbpp_prompt(r), "solution": r["code"].replace("\r\n", "\n"),
             "test_setup_code": r.get("test_setup_code", ""), "test_list": list(r["test_list"])}
            for r in _jsonl(path) if int(r["task_id"]) in (2, 3, 4)]


_GSM8K_CALCULATOR = re.compile(r"<<[^>]*>>")


def _gsm8k_doc(r: dict[str, Any]) -> dict[str, Any]:
    """``prompt`` = ``Question: ...\\nAnswer:``; ``target`` = the raw worked answer (few-shot / generation, as in
    lm-eval); ``solution`` = the same without the ``<<48/2=24>>`` calculator annotations (the likelihood proxy
    scores natural text)."""
    answer = r["answer"].strip()
    return {"prompt": f"Question: {r['question']}\nAnswer:", "target": " " + answer,
            "solution": " " + _GSM8K_CALCULATOR.sub("", answer), "question": r["question"], "answer": r["answer"]}


def _docs_gsm8k(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    """GSM8K ``test.jsonl`` (the ``train.jsonl`` next to it only provides few-shot examples)."""
    if paths[0].name != "test.jsonl":
        raise RuntimeError(f"GSM8K evaluation must read test.jsonl, not {paths[0]}")
    return [_gsm8k_doc(r) for r in _jsonl(paths[0])]


def _docs_math(paths: list[Path], options: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"prompt": f"Problem:\n{r['problem']}\n\nSolution:", "solution": " " + r["solution"].strip(),
             "level": r.get("level", ""), "type": r.get("type", "")} for r in _jsonl(paths[0])]


_READERS: dict[str, Callable[[list[Path], dict[str, Any]], list[dict[str, Any]]]] = {
    "mmlu": _docs_mmlu,
    "mmlu_cloze": _docs_mmlu_cloze,
    "lambada": _docs_lambada,
    "hellaswag": _docs_hellaswag,
    "piqa": _docs_piqa,
    "arc_easy": _docs_foundry_qa,
    "arc_challenge": _docs_foundry_qa,
    "boolq": _docs_foundry_qa,
    "openbookqa": _docs_openbookqa,
    "winogrande": _docs_winogrande,
    "humaneval": _docs_humaneval,
    "humaneval_nll": _docs_humaneval,
    "mbpp": _docs_mbpp,
    "mbpp_nll": _docs_mbpp,
    "gsm8k": _docs_gsm8k,
    "gsm8k_nll": _docs_gsm8k,
    "math": _docs_math,
    "math_nll": _docs_math,
}


def _b(name: str, dimension: str, kind: str, metric: str, files: tuple[str, ...], description: str, **kw: Any
       ) -> Benchmark:
    hib = kw.pop("higher_is_better", metric not in ("nll", "perplexity"))
    return Benchmark(name, dimension, kind, metric, hib, files, description, **kw)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        # General
        _b("mmlu", "general", "lm_eval", "acc", ("mmlu/test", "mmlu/dev"),
           "MMLU test (57 subjects interleaved), letter answer, optional same-subject dev shots",
           hub_task="mmlu", hub_metric="acc", options={"num_fewshot": 0}),
        _b("mmlu_cloze", "general", "lm_eval", "acc_norm", ("mmlu/test",),
           "MMLU test in cloze form (answer texts as choices), 0-shot", hub_task="mmlu_continuation",
           hub_metric="acc_norm"),
        _b("lambada", "general", "lm_eval", "acc", ("lambada_openai/lambada_openai.jsonl",),
           "LAMBADA (OpenAI) last-word greedy accuracy", hub_task="lambada_openai", hub_metric="acc"),
        _b("wikitext2", "general", "perplexity", "perplexity", ("wikitext-2/wiki.test.raw",),
           "WikiText-2 raw test perplexity on non-overlapping windows",
           options={"seqlen": 512, "max_windows": 16}),
        # Commonsense
        _b("hellaswag", "commonsense", "lm_eval", "acc_norm", ("hellaswag/hellaswag_val_first9842.txt.bz2",),
           "HellaSwag val (llama.cpp text layout)", hub_task="hellaswag", hub_metric="acc_norm"),
        _b("piqa", "commonsense", "lm_eval", "acc_norm", ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
           "PIQA valid", hub_task="piqa", hub_metric="acc_norm"),
        _b("arc_easy", "commonsense", "lm_eval", "acc_norm", ("arc_easy/arc_easy.jsonl",),
           "ARC-Easy test", hub_task="arc_easy", hub_metric="acc_norm"),
        _b("arc_challenge", "commonsense", "lm_eval", "acc_norm", ("arc_challenge/arc_challenge.jsonl",),
           "ARC-Challenge test", hub_task="arc_challenge", hub_metric="acc_norm"),
        _b("winogrande", "commonsense", "lm_eval", "acc", ("winogrande/winogrande.jsonl",),
           "WinoGrande dev 1.1 (partial scoring)", hub_task="winogrande", hub_metric="acc"),
        _b("boolq", "commonsense", "lm_eval", "acc", ("boolq/boolq.jsonl",),
           "BoolQ dev", hub_task="boolq", hub_metric="acc"),
        _b("openbookqa", "commonsense", "lm_eval", "acc_norm", ("openbookqa/openbook_qa.jsonl",),
           "OpenBookQA test", hub_task="openbookqa", hub_metric="acc_norm"),
        # Code
        _b("humaneval_nll", "code", "proxy", "nll", ("humaneval/HumanEval.jsonl.gz",),
           "HumanEval: NLL/token of canonical_solution given the prompt"),
        _b("mbpp_nll", "code", "proxy", "nll", ("mbpp/mbpp.jsonl",),
           "MBPP test ids 11-510: NLL/token of the reference code given the lm-eval prompt"),
        _b("humaneval", "code", "lm_eval", "pass@1", ("humaneval/HumanEval.jsonl.gz",),
           "HumanEval greedy pass@1 (executes generated code)", hub_task="humaneval", hub_metric="pass@1",
           generative=True, executes_code=True, options={"max_gen_toks": 512}),
        _b("mbpp", "code", "lm_eval", "pass@1", ("mbpp/mbpp.jsonl",),
           "MBPP test ids 11-510, 3-shot (prompt ids 2-4), greedy pass@1 (executes generated code)",
           hub_task="mbpp", hub_metric="pass_at_1", generative=True, executes_code=True,
           options={"num_fewshot": 3, "max_gen_toks": 512}),
        # Math
        _b("gsm8k_nll", "math", "proxy", "nll", ("gsm8k/test.jsonl",),
           "GSM8K test: NLL/token of the worked answer given the question"),
        _b("math_nll", "math", "proxy", "nll", ("math/test.jsonl",),
           "MATH test: NLL/token of the worked solution given the problem"),
        _b("gsm8k", "math", "lm_eval", "exact_match", ("gsm8k/test.jsonl", "gsm8k/train.jsonl"),
           "GSM8K test, 5-shot (first train examples), greedy, strict '#### n' exact match",
           hub_task="gsm8k", hub_metric="exact_match,strict-match", generative=True,
           options={"num_fewshot": 5, "max_gen_toks": 256}),
        _b("math", "math", "lm_eval", "exact_match", ("math/test.jsonl",),
           "MATH test, 0-shot, greedy, last \\boxed{} answer string match after light normalisation",
           hub_task="minerva_math", hub_metric="exact_match", generative=True, options={"max_gen_toks": 512}),
    )
}


def load_docs(name: str, data_dir: Path, options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The converted documents of benchmark ``name`` from ``data_dir`` (all of them; limits are applied later)."""
    bench = BENCHMARKS[name]
    opts = {**bench.options, **(options or {})}
    paths = [data_dir / rel for rel in bench.files]
    return _READERS[name](paths, opts)


# ---------------------------------------------------------------------------------------------------------------
# lm-eval YAML rendering
# ---------------------------------------------------------------------------------------------------------------

FUNCTIONS_MODULE = "calibprune_task_functions"  # the shim written next to the YAMLs, for ``!function``


class _FunctionRef(str):
    """A YAML scalar written as ``!function <module>.<name>``."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_FunctionRef, lambda d, v: d.represent_scalar("!function", str(v)))

_ACC = {"aggregation": "mean", "higher_is_better": True}


def _write_jsonl(path: Path, docs: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def _task_config(bench: Benchmark, data_files: dict[str, str], opts: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": bench.task_name,
        "dataset_path": "json",
        # the arrow cache goes next to the temporary JSONL, not into ~/.cache/huggingface
        "dataset_kwargs": {"data_files": data_files, "cache_dir": str(Path(data_files["test"]).parent / "hf_cache")},
        "test_split": "test",
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "source": "calibprune offline"},
    }
    name = bench.name
    if name == "lambada":
        cfg |= {"output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "target",
                "target_delimiter": "", "metric_list": [{"metric": "acc", **_ACC}]}
    elif name == "winogrande":
        cfg |= {"output_type": "multiple_choice", "doc_to_text": "gold", "doc_to_choice": "options",
                "doc_to_target": "continuation", "metric_list": [{"metric": "acc", **_ACC}]}
    elif bench.kind == "lm_eval" and not bench.generative:
        cfg |= {"output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices",
                "doc_to_target": "gold",
                "metric_list": [{"metric": "acc", **_ACC}, {"metric": "acc_norm", **_ACC}]}
    elif name == "gsm8k":
        cfg |= {
            "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "target",
            "target_delimiter": "", "fewshot_split": "train", "fewshot_config": {"sampler": "first_n"},
            "num_fewshot": int(opts["num_fewshot"]),
            "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                  "max_gen_toks": int(opts["max_gen_toks"])},
            "process_results": _FunctionRef(f"{FUNCTIONS_MODULE}.gsm8k_process_results"),
            "metric_list": [{"metric": "exact_match", **_ACC}],
        }
    elif name == "math":
        cfg |= {
            "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "solution",
            "target_delimiter": "",
            "generation_kwargs": {"until": ["Problem:", "</s>", "<|im_end|>"], "do_sample": False,
                                  "max_gen_toks": int(opts["max_gen_toks"])},
            "process_results": _FunctionRef(f"{FUNCTIONS_MODULE}.math_process_results"),
            "metric_list": [{"metric": "exact_match", **_ACC}],
        }
    elif name == "humaneval":
        cfg |= {
            "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "solution",
            "target_delimiter": "", "unsafe_code": True,
            "generation_kwargs": {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "do_sample": False,
                                  "max_gen_toks": int(opts["max_gen_toks"])},
            "process_results": _FunctionRef(f"{FUNCTIONS_MODULE}.humaneval_process_results"),
            "metric_list": [{"metric": "pass@1", **_ACC}],
        }
    elif name == "mbpp":
        cfg |= {
            "output_type": "generate_until", "doc_to_text": "prompt",
            "doc_to_target": "{{solution}}\n[DONE]", "target_delimiter": "", "unsafe_code": True,
            "fewshot_split": "fewshot", "fewshot_config": {"sampler": "first_n"},
            "num_fewshot": int(opts["num_fewshot"]),
            "generation_kwargs": {"until": ["[DONE]"], "do_sample": False, "max_gen_toks": int(opts["max_gen_toks"])},
            "process_results": _FunctionRef(f"{FUNCTIONS_MODULE}.mbpp_process_results"),
            "metric_list": [{"metric": "pass@1", **_ACC}],
        }
    else:
        raise ValueError(f"benchmark {name!r} is not an lm-eval task")
    return cfg


def render_lm_eval_task(name: str, docs: list[dict[str, Any]], out_dir: str | os.PathLike[str], *,
                        data_dir: Path, options: dict[str, Any] | None = None) -> Path:
    """Write ``docs`` as ``<out_dir>/data/<name>.jsonl`` and the task config ``<out_dir>/<task>.yaml``.

    Few-shot slices (GSM8K train, MBPP prompt ids) are written beside the test file. Returns the YAML path.
    """
    bench = BENCHMARKS[name]
    opts = {**bench.options, **(options or {})}
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    test_file = out / "data" / f"{name}.test.jsonl"
    _write_jsonl(test_file, docs)
    data_files = {"test": str(test_file)}
    if name == "gsm8k":
        shots = [_gsm8k_doc(r) for _, r in zip(range(max(int(opts["num_fewshot"]), 1)),
                                                _jsonl(data_dir / bench.files[1]))]
        data_files["train"] = str(out / "data" / f"{name}.train.jsonl")
        _write_jsonl(Path(data_files["train"]), shots)
    elif name == "mbpp":
        data_files["fewshot"] = str(out / "data" / f"{name}.fewshot.jsonl")
        _write_jsonl(Path(data_files["fewshot"]), mbpp_fewshot_docs(data_dir / bench.files[0]))
    cfg = _task_config(bench, data_files, opts)
    path = out / f"{bench.task_name}.yaml"
    path.write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True), encoding="utf-8")
    shim = out / f"{FUNCTIONS_MODULE}.py"
    if not shim.exists():
        shim.write_text(
            '"""Generated by calibprune: the scoring functions its offline lm-eval task configs reference."""\n'
            "from calibprune.evaluation.lm_eval_functions import (  # noqa: F401\n"
            "    gsm8k_process_results, humaneval_process_results, math_process_results, mbpp_process_results,\n"
            ")\n", encoding="utf-8")
    return path


def data_revision(names: Iterable[str], data_dir: Path | None) -> str | None:
    """sha256[:16] of the offline files' contents the selected benchmarks read."""
    if data_dir is None:
        return None
    h = hashlib.sha256()
    for name in sorted(names):
        for rel in BENCHMARKS[name].files:
            path = data_dir / rel
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for f in files:
                if f.is_file():
                    h.update(str(f.relative_to(data_dir)).encode())
                    h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]
