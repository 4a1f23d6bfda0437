"""Registry of calibration text sources: where each one lives, how a record becomes text.

Every source has a real Hugging Face hub loader (for users who can reach the hub) and, for most, an offline copy
under a data directory (``CALIBPRUNE_DATA_DIR``; see ``shared/data/MANIFEST.md`` for the formats). ``load_texts``
returns plain, formatted documents in a deterministic order; tokenisation, packing and sampling belong to the
calibration builder.

Calibration splits never overlap evaluation splits. This is enforced in code, not only documented:

- ``gsm8k`` reads ``train.jsonl`` / the hub ``train`` split only (``test`` is the Math evaluation set);
- ``mbpp`` keeps task ids 601-974 only, the standard train ids (1-10 are the few-shot prompt, 11-510 the test
  set, 511-600 validation), whatever file or hub split the records come from;
- ``wikitext2`` reads ``valid.txt`` offline, never ``test.txt`` / ``wiki.test.raw`` (General perplexity eval).

Formats (one record -> one document):

- question + worked answer -> ``"Question: ...\\nAnswer: ..."`` (gsm8k, metamath);
- instruction (+ input) + response -> the Alpaca template (alpaca, dolly, codealpaca);
- code -> the natural-language query or docstring as a ``#`` comment above the code (mbpp, cosqa);
- running text -> the text itself (c4, wikipedia, slimpajama, ...); wikitext is split into articles and
  Shakespeare into chunks of whole speeches of about ``SHAKESPEARE_CHUNK_CHARS`` characters.

Normalisation is minimal: CRLF -> LF, surrounding whitespace stripped, empty documents dropped, exact duplicates
dropped (first occurrence kept).
"""
from __future__ import annotations

import contextvars
import csv
import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._hub import hub_unavailable_reason

__all__ = [
    "check_available",
    "DataFileError",
    "DataUnavailableError",
    "DATA_DIR_ENV",
    "DIMENSIONS",
    "SHAKESPEARE_CHUNK_CHARS",
    "SOURCES",
    "Source",
    "list_sources",
    "load_texts",
    "offline_files",
    "resolve_data_dir",
]

logger = logging.getLogger(__name__)

DIMENSIONS: tuple[str, ...] = ("general", "commonsense", "code", "math")
DATA_DIR_ENV = "CALIBPRUNE_DATA_DIR"
# About one scene, ~2k tokens for Llama-style tokenisers: long enough to hold a seqlen-2048 window.
SHAKESPEARE_CHUNK_CHARS = 8000
# Hub sources streamed from very large corpora stop here unless ``max_docs`` says otherwise.
_STREAMING_DEFAULT_MAX_DOCS = 10_000

MBPP_TRAIN_IDS = range(601, 975)  # standard MBPP train task ids (601-974)
# Train tasks whose text and code are an exact copy of a test task (704 == test task 248); dropped on every path.
_MBPP_TRAIN_IDS_COPYING_TEST = frozenset({704})
GSM8K_CALIBRATION_SPLIT = "train"

_ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
_ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Source:
    """One calibration text source.

    ``offline_path`` is relative to the data directory: a file, or a folder for sources made of several files
    (codealpaca, cosqa); ``None`` when the source is hub-only. ``short_docs`` marks sources whose documents are
    short (Q/A pairs, instructions, single functions) and must be packed with EOS to fill a sequence.
    """

    name: str
    dimension: str
    description: str
    hub_id: str
    hub_config: str | None
    hub_split: str
    offline_path: str | None
    short_docs: bool
    licence: str

    def __post_init__(self) -> None:
        if self.dimension not in DIMENSIONS:
            raise ValueError(f"Source {self.name!r}: dimension {self.dimension!r} is not one of {DIMENSIONS}")


# ---------------------------------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------------------------------


class DataFileError(ValueError):
    """An offline data file that cannot be read as its source's format; the message names the file and line."""


class DataUnavailableError(FileNotFoundError):
    """A source has no usable offline copy and the Hugging Face hub cannot be used (or failed)."""


# Where the offline reader is (file and line / item), so that a bad record's error can name it.
_READING: contextvars.ContextVar[str | None] = contextvars.ContextVar("calibprune_reading", default=None)


class _Record(dict):
    """A data record that names its file and line when a required field is missing."""

    where = ""

    def __missing__(self, key: str) -> Any:
        fields = ", ".join(repr(k) for k in list(self)[:12]) or "none"
        raise DataFileError(f"{self.where}: record has no field {key!r} (it has: {fields})")


def _record(obj: Any, where: str) -> _Record:
    if not isinstance(obj, dict):
        raise DataFileError(f"{where}: expected a JSON object (a record), got {type(obj).__name__}")
    rec = _Record(obj)
    rec.where = where
    return rec


def _clean(text: str | None) -> str:
    """CRLF -> LF (and stray CR -> LF), strip surrounding whitespace."""
    if not text:
        return ""
    if not isinstance(text, str):
        raise DataFileError(f"{_READING.get() or 'a record'}: expected text, got {type(text).__name__} {text!r:.60}")
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _qa(question: str, answer: str) -> str | None:
    """``Question: ...\nAnswer: ...``; ``None`` (dropped) when either part is empty."""
    question, answer = _clean(question), _clean(answer)
    if not question or not answer:
        return None
    return f"Question: {question}\nAnswer: {answer}"


def _alpaca(instruction: str, input_text: str | None, response: str) -> str | None:
    """The Alpaca prompt template followed by the response; ``None`` (dropped) without instruction or response."""
    instruction, input_text, response = _clean(instruction), _clean(input_text), _clean(response)
    if not instruction or not response:
        return None
    if input_text:
        return (
            f"{_ALPACA_HEADER_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n"
            f"### Response:\n{response}"
        )
    return f"{_ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}"


def _commented_code(comment: str | None, code: str) -> str | None:
    """The natural-language ``comment`` as ``#`` lines above ``code`` (just the code when there is none)."""
    code, comment = _clean(code), _clean(comment)
    if not code:
        return None
    if not comment:
        return code
    lines = "\n".join(f"# {line}".rstrip() for line in comment.split("\n"))
    return f"{lines}\n{code}"


def _wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText lines into articles; an article starts at a top-level heading `` = Title = ``."""
    heading = re.compile(r"^ ?= [^=].* = ?$")
    article: list[str] = []
    for raw in lines:
        raw = raw.rstrip("\r\n")
        if heading.match(raw) and article:
            yield "\n".join(article)
            article = []
        line = raw.strip()
        if line:
            article.append(line)
    if article:
        yield "\n".join(article)


def _shakespeare_chunks(text: str, target_chars: int = SHAKESPEARE_CHUNK_CHARS) -> Iterator[str]:
    """Split the play text at speech boundaries (blank lines) into chunks of about ``target_chars``."""
    speeches = [s.strip() for s in re.split(r"\n\s*\n", _clean(text)) if s.strip()]
    chunk: list[str] = []
    size = 0
    for speech in speeches:
        chunk.append(speech)
        size += len(speech) + 2
        if size >= target_chars:
            yield "\n\n".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield "\n\n".join(chunk)


def _pubmed_abstract_offline(context: str) -> str:
    """The abstract from an llm-foundry PubMedQA ``context``: drop the ``Context:`` prefix and the question."""
    text = _clean(context)
    text = text.removeprefix("Context:").strip()
    return text.split("\nQuestion:", 1)[0]


def _pubmed_abstract_hub(record: Mapping[str, Any]) -> str:
    ctx = record["context"]
    labels = ctx.get("labels") or [""] * len(ctx["contexts"])
    sections = zip(labels, ctx["contexts"], strict=False)
    return "\n".join(f"{label.upper()}. {_clean(c)}" if label else _clean(c) for label, c in sections)


# ---------------------------------------------------------------------------------------------------------------
# Offline readers: each yields formatted documents from the files under the data directory.
# ---------------------------------------------------------------------------------------------------------------


def _json_problem(exc: json.JSONDecodeError) -> str:
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a line that is not a JSON object raises :class:`DataFileError` naming it."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}, line {lineno}"
            _READING.set(where)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(f"{where}: not valid JSON ({_json_problem(exc)})") from None
            yield _record(obj, where)


def _read_json_array(path: Path) -> list[dict[str, Any]]:
    """Records of a file holding one JSON array of objects."""
    _READING.set(str(path))
    try:
        with path.open(encoding="utf-8") as f:
            blob = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}, line {exc.lineno}: not valid JSON ({_json_problem(exc)})") from None
    if not isinstance(blob, list):
        raise DataFileError(f"{path}: expected a JSON array of records, got {type(blob).__name__}")
    return [_record(obj, f"{path}, item {i}") for i, obj in enumerate(blob)]


def _offline_c4(paths: list[Path]) -> Iterator[str]:
    """C4 en sample (LLaMA-Factory ``c4_demo.jsonl``): the ``text`` field of each line."""
    for rec in _read_jsonl(paths[0]):
        yield rec["text"]


def _offline_wikitext2(paths: list[Path]) -> Iterator[str]:
    """WikiText-2 *valid* split (tokenised, with ``<unk>``), one document per article."""
    with paths[0].open(encoding="utf-8") as f:
        yield from _wikitext_articles(f)


def _offline_wikipedia(paths: list[Path]) -> Iterator[str]:
    """Wikipedia sample (LLaMA-Factory ``wiki_demo.txt``): one article per line."""
    with paths[0].open(encoding="utf-8") as f:
        yield from f


def _offline_shakespeare(paths: list[Path]) -> Iterator[str]:
    """Tiny Shakespeare ``input.txt`` in chunks of whole speeches (see ``SHAKESPEARE_CHUNK_CHARS``)."""
    yield from _shakespeare_chunks(paths[0].read_text(encoding="utf-8"))


def _offline_gsm8k(paths: list[Path]) -> Iterator[str | None]:
    """GSM8K ``train.jsonl`` only: ``Question: <question>\\nAnswer: <worked answer ending in #### n>``."""
    if paths[0].name != "train.jsonl":  # the split guard: test.jsonl is the Math evaluation set
        raise RuntimeError(f"gsm8k calibration must read train.jsonl, not {paths[0]}")
    for rec in _read_jsonl(paths[0]):
        yield _qa(rec["question"], rec["answer"])


def _mbpp_doc(rec: Mapping[str, Any]) -> str | None:
    """A train task (ids 601-974) as comment + code; ``None`` for any other id, which must never be calibrated on."""
    try:
        task_id = int(rec["task_id"])
    except (TypeError, ValueError):
        where = getattr(rec, "where", "a record")
        raise DataFileError(f"{where}: task_id {rec['task_id']!r} is not an integer") from None
    if task_id not in MBPP_TRAIN_IDS or task_id in _MBPP_TRAIN_IDS_COPYING_TEST:
        return None
    return _commented_code(rec["text"], rec["code"])


def _offline_mbpp(paths: list[Path]) -> Iterator[str | None]:
    """MBPP ``mbpp.jsonl``, task ids 601-974 only: the task text as a comment, then the reference code.

    Train tasks whose document is identical to a non-train task of the same file are dropped as well.
    """
    records = list(_read_jsonl(paths[0]))
    docs = [(rec, _mbpp_doc(rec)) for rec in records]  # validates every task id
    others = {_commented_code(r["text"], r["code"]) for r, d in docs if int(r["task_id"]) not in MBPP_TRAIN_IDS}
    for rec, doc in docs:
        if doc is not None and doc in others:
            logger.info("mbpp: dropping train task %s, an exact copy of a non-train task", rec["task_id"])
            continue
        yield doc


def _offline_codealpaca(paths: list[Path]) -> Iterator[str | None]:
    """CodeAlpaca ``code_alpaca_2k.json`` then ``new_codealpaca.json``, in the Alpaca template."""
    for path in paths:
        for rec in _read_json_array(path):
            yield _alpaca(rec["instruction"], rec.get("input"), rec.get("output") or rec.get("response", ""))


def _offline_cosqa(paths: list[Path]) -> Iterator[str | None]:
    """CoSQA dev + WebQuery test: the web query as a comment above the Python function.

    Pairs labelled 0 (the function does not answer the query) keep the function but drop the query, so that the
    comment never describes unrelated code.
    """
    for path in paths:
        for rec in _read_json_array(path):
            query = rec.get("doc") if rec.get("label", 1) == 1 else None
            yield _commented_code(query, rec["code"])


def _offline_alpaca(paths: list[Path]) -> Iterator[str | None]:
    """Alpaca sample (LLaMA-Factory ``alpaca_en_demo.json``) in the Alpaca template."""
    for rec in _read_json_array(paths[0]):
        yield _alpaca(rec["instruction"], rec.get("input"), rec["output"])


def _offline_dolly(paths: list[Path]) -> Iterator[str | None]:
    """Dolly/HH small (llm-foundry): ``prompt`` (already in the Alpaca template) followed by ``response``."""
    for rec in _read_jsonl(paths[0]):
        prompt, response = _clean(rec["prompt"]), _clean(rec["response"])
        yield f"{prompt}\n{response}" if prompt and response else None


def _offline_pubmed(paths: list[Path]) -> Iterator[str]:
    """PubMedQA labelled (llm-foundry): the abstract from ``context`` only, no question and no yes/no answer."""
    for rec in _read_jsonl(paths[0]):
        yield _pubmed_abstract_offline(rec["context"])


def _offline_legal(paths: list[Path]) -> Iterator[str]:
    """LegalBench SSLA TSV: the complaint excerpt in the ``text`` column (not the ``answer``)."""
    csv.field_size_limit(sys.maxsize)
    with paths[0].open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for row in reader:
            where = f"{paths[0]}, line {reader.line_num}"
            _READING.set(where)
            yield _record(row, where)["text"]


# ---------------------------------------------------------------------------------------------------------------
# Hub record formatters: one record of the hub dataset -> one document.
# ---------------------------------------------------------------------------------------------------------------


def _hub_text(record: Mapping[str, Any]) -> str:
    return record["text"]


def _hub_mbpp(record: Mapping[str, Any]) -> str | None:
    return _mbpp_doc(record)


@dataclass(frozen=True)
class _Loader:
    """How to read a source: offline files (relative to the data dir) and the hub record formatter."""

    files: tuple[str, ...] = ()
    offline: Callable[[list[Path]], Iterable[str | None]] | None = None
    hub_record: Callable[[Mapping[str, Any]], str | None] | None = None
    # Whole-dataset post-processing of hub records (wikitext lines -> articles); replaces hub_record when set.
    hub_all: Callable[[Iterable[Mapping[str, Any]]], Iterable[str]] | None = None
    hub_kwargs: Mapping[str, Any] = field(default_factory=dict)
    streaming: bool = False


def _hub_wikitext(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    return _wikitext_articles(r["text"] for r in records)


def _hub_shakespeare(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    for r in records:
        yield from _shakespeare_chunks(r["text"])


# The registry. Descriptions state the split used; the loaders below enforce the eval-disjoint ones.
SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "c4", "general",
            "C4 English web text. Offline: the 300-document LLaMA-Factory sample; hub: allenai/c4 'en' "
            "validation split (streamed, first shard first), as in SparseGPT/Wanda.",
            "allenai/c4", "en", "validation", "c4_sample/c4_demo.jsonl", False, "ODC-BY",
        ),
        Source(
            "wikitext2", "general",
            "WikiText-2 Wikipedia articles, one document per article. Offline: the tokenised *valid* split "
            "(valid.txt, with <unk>), since no train split is shipped; hub: wikitext-2-raw-v1 train. Never the test "
            "split, which is the General perplexity evaluation.",
            "Salesforce/wikitext", "wikitext-2-raw-v1", "train", "wikitext-2/valid.txt", False, "CC BY-SA 3.0 / GFDL",
        ),
        Source(
            "wikipedia", "general",
            "English Wikipedia articles. Offline: 30 articles (LLaMA-Factory wiki_demo, one per line); hub: "
            "wikimedia/wikipedia 20231101.en train (streamed).",
            "wikimedia/wikipedia", "20231101.en", "train", "wiki_demo/wiki_demo.txt", False, "CC BY-SA 3.0",
        ),
        Source(
            "shakespeare", "general",
            "Tiny Shakespeare (karpathy/char-rnn input.txt) in chunks of whole speeches of about "
            f"{SHAKESPEARE_CHUNK_CHARS} characters; hub: karpathy/tiny_shakespeare train split.",
            "karpathy/tiny_shakespeare", None, "train", "tinyshakespeare/input.txt", False, "public domain",
        ),
        Source(
            "slimpajama", "general",
            "SlimPajama (deduplicated RedPajama: web, books, arXiv, GitHub, Wikipedia, StackExchange), hub only: "
            "DKYoon/SlimPajama-6B train (streamed); cerebras/SlimPajama-627B is the full corpus.",
            "DKYoon/SlimPajama-6B", None, "train", None, False, "various (see SlimPajama card)",
        ),
        Source(
            "pubmed", "general",
            "PubMedQA (pqa_labeled) biomedical abstracts: the abstract sections only, never the question or the "
            "yes/no/maybe label. PubMedQA is also an optional evaluation: do not report it for a model calibrated "
            "on this source. Offline: first 800 of the 1,000 labelled items; hub: qiaojin/PubMedQA pqa_labeled train.",
            "qiaojin/PubMedQA", "pqa_labeled", "train", "pubmedqa/pubmed_qa_labeled.jsonl", False, "MIT",
        ),
        Source(
            "legal", "general",
            "Securities class-action complaint excerpts (LegalBench ssla_individual_defendants, the `text` column; "
            "LegalBench is not one of our evaluations). Offline: test_old.tsv; hub: nguha/legalbench "
            "ssla_individual_defendants test.",
            "nguha/legalbench", "ssla_individual_defendants", "test", "legal_ssla/test_old.tsv", False, "CC BY 4.0",
        ),
        Source(
            "alpaca", "commonsense",
            "Alpaca instruction/response pairs in the Alpaca template. Dimension 'commonsense': everyday "
            "instruction following is the closest of our four capabilities (no code/math focus). Offline: the "
            "999-item LLaMA-Factory alpaca_en_demo; hub: tatsu-lab/alpaca train.",
            "tatsu-lab/alpaca", None, "train", "alpaca_en_demo/alpaca_en_demo.json", True, "CC BY-NC 4.0",
        ),
        Source(
            "dolly", "commonsense",
            "Human-written instructions and responses in the Alpaca template. Dimension 'commonsense': everyday "
            "instruction following and open QA. Offline: llm-foundry dolly_hhrlhf_train_small (Dolly-15k + "
            "Anthropic HH mix, 1,000 items); hub: databricks/databricks-dolly-15k train.",
            "databricks/databricks-dolly-15k", None, "train", "dolly_hhrlhf_small/dolly_hhrlhf_train_small.jsonl",
            True, "CC BY-SA 3.0 (Dolly); MIT (HH-RLHF)",
        ),
        Source(
            "gsm8k", "math",
            "GSM8K grade-school maths, 'Question: ...\\nAnswer: ...' with the worked solution (calculator "
            "annotations and the final '#### n' kept). TRAIN split only (enforced): the test split is the Math "
            "evaluation. Hub: openai/gsm8k main train.",
            "openai/gsm8k", "main", "train", "gsm8k/train.jsonl", True, "MIT",
        ),
        Source(
            "metamath", "math",
            "MetaMathQA (GSM8K/MATH train questions, rephrased and augmented) as 'Question: ...\\nAnswer: ...', "
            "hub only: meta-math/MetaMathQA train.",
            "meta-math/MetaMathQA", None, "train", None, True, "MIT",
        ),
        Source(
            "openwebmath", "math",
            "OpenWebMath: mathematical web pages with LaTeX, hub only: open-web-math/open-web-math train (streamed).",
            "open-web-math/open-web-math", None, "train", None, False, "ODC-BY",
        ),
        Source(
            "mbpp", "code",
            "MBPP Python tasks: the task text as a '#' comment above the reference solution. Task ids 601-974 only "
            "(the standard train ids; enforced): 11-510 are the Code evaluation, 1-10 the few-shot prompt, 511-600 "
            "validation. Hub: google-research-datasets/mbpp full train.",
            "google-research-datasets/mbpp", "full", "train", "mbpp/mbpp.jsonl", True, "CC BY 4.0",
        ),
        Source(
            "codealpaca", "code",
            "Code instructions and solutions in the Alpaca template. Offline: code_alpaca_2k.json + "
            "new_codealpaca.json (6.5k items); hub: sahil2801/CodeAlpaca-20k train (the 20k file, same format).",
            "sahil2801/CodeAlpaca-20k", None, "train", "codealpaca", True, "CC BY-NC 4.0",
        ),
        Source(
            "cosqa", "code",
            "Python functions with a natural-language query as a '#' comment. Offline: CodeXGLUE CoSQA dev + "
            "WebQuery test (the query is kept only for pairs labelled as matching; many WebQuery functions have "
            "their newlines collapsed); hub: code-search-net/code_search_net python train (whole function with "
            "its docstring; may need trust_remote_code on older `datasets`).",
            "code-search-net/code_search_net", "python", "train", "python_code_cosqa", True,
            "C-UDA (CodeXGLUE); code from CodeSearchNet (various)",
        ),
        Source(
            "the_stack", "code",
            "Python source files from The Stack (smol), hub only: bigcode/the-stack-smol data/python train "
            "(gated: accept the terms and log in).",
            "bigcode/the-stack-smol", None, "train", None, False, "various permissive (see The Stack card)",
        ),
    )
}

_LOADERS: dict[str, _Loader] = {
    "c4": _Loader(("c4_sample/c4_demo.jsonl",), _offline_c4, _hub_text, streaming=True),
    "wikitext2": _Loader(("wikitext-2/valid.txt",), _offline_wikitext2, hub_all=_hub_wikitext),
    "wikipedia": _Loader(("wiki_demo/wiki_demo.txt",), _offline_wikipedia, _hub_text, streaming=True),
    "shakespeare": _Loader(("tinyshakespeare/input.txt",), _offline_shakespeare, hub_all=_hub_shakespeare),
    "slimpajama": _Loader(hub_record=_hub_text, streaming=True),
    "pubmed": _Loader(("pubmedqa/pubmed_qa_labeled.jsonl",), _offline_pubmed, _pubmed_abstract_hub),
    "legal": _Loader(("legal_ssla/test_old.tsv",), _offline_legal, _hub_text),
    "alpaca": _Loader(
        ("alpaca_en_demo/alpaca_en_demo.json",), _offline_alpaca,
        lambda r: _alpaca(r["instruction"], r.get("input"), r["output"]),
    ),
    "dolly": _Loader(
        ("dolly_hhrlhf_small/dolly_hhrlhf_train_small.jsonl",), _offline_dolly,
        lambda r: _alpaca(r["instruction"], r.get("context"), r["response"]),
    ),
    "gsm8k": _Loader(("gsm8k/train.jsonl",), _offline_gsm8k, lambda r: _qa(r["question"], r["answer"])),
    "metamath": _Loader(hub_record=lambda r: _qa(r["query"], r["response"])),
    "openwebmath": _Loader(hub_record=_hub_text, streaming=True),
    "mbpp": _Loader(("mbpp/mbpp.jsonl",), _offline_mbpp, _hub_mbpp),
    "codealpaca": _Loader(
        ("codealpaca/code_alpaca_2k.json", "codealpaca/new_codealpaca.json"), _offline_codealpaca,
        lambda r: _alpaca(r["instruction"], r.get("input"), r["output"]),
    ),
    "cosqa": _Loader(
        ("python_code_cosqa/cosqa-dev.json", "python_code_cosqa/test_webquery.json"), _offline_cosqa,
        lambda r: _clean(r["whole_func_string"]),
    ),
    "the_stack": _Loader(
        hub_record=lambda r: r["content"], hub_kwargs={"data_dir": "data/python"}, streaming=True,
    ),
}

# Splits that would leak evaluation data into calibration; the hub loader refuses anything else.
_REQUIRED_HUB_SPLIT = {"gsm8k": GSM8K_CALIBRATION_SPLIT, "mbpp": "train"}


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The offline data directory.

    Order: the explicit ``data_dir`` argument, then the ``CALIBPRUNE_DATA_DIR`` environment variable (both
    returned as given, even if missing, so that errors name them), then the first existing of ``./shared/data``,
    ``../shared/data`` (relative to the working directory) and ``<repo root>/../shared/data`` (repo root = parent
    of the ``calibprune`` package directory, for source checkouts). ``None`` when nothing is found.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    for candidate in _default_candidates():
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _default_candidates() -> list[Path]:
    repo_root = Path(__file__).resolve().parents[2]
    return [Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data", repo_root.parent / "shared" / "data"]


def _data_dir_origin(data_dir: str | os.PathLike[str] | None) -> str:
    """Where the data directory setting came from, for messages."""
    if data_dir is not None:
        return "data_dir / --data-dir"
    if os.environ.get(DATA_DIR_ENV):
        return f"${DATA_DIR_ENV}"
    return "the default locations"


def offline_files(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The offline files of source ``name`` under the (resolved) data directory; ``[]`` for hub-only sources."""
    return _offline_files(_check_name(name).name, resolve_data_dir(data_dir))


def _offline_files(name: str, data_dir: Path | None) -> list[Path]:
    return [data_dir / rel for rel in _LOADERS[name].files] if data_dir is not None else []


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _offline_available(name: str, data_dir: Path | None) -> bool:
    files = _offline_files(name, data_dir)
    return bool(files) and all(p.is_file() for p in files)


def list_sources(*, offline_only: bool = False, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Registered source names, in registry order; with ``offline_only``, those whose files exist in the data dir."""
    if not offline_only:
        return list(SOURCES)
    resolved = resolve_data_dir(data_dir)
    return [name for name in SOURCES if _offline_available(name, resolved)]


def _check_name(name: str) -> Source:
    if name in SOURCES:
        return SOURCES[name]
    close = difflib.get_close_matches(name, list(SOURCES), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown calibration source {name!r}.{hint} Known sources: {', '.join(SOURCES)}.")


def _missing_offline_message(src: Source, data_dir: Path | None) -> str:
    if _LOADERS[src.name].offline is None:
        return (f"Source {src.name!r} has no offline copy (hub only: {src.hub_id}); use source='hub' or 'auto' "
                "with `datasets` installed and the Hugging Face hub reachable.")
    return (f"Offline data for source {src.name!r} not found: {_offline_search(src, data_dir)}. Point "
            f"{DATA_DIR_ENV} (or data_dir=) at the folder that holds the offline copies (e.g. export "
            "CALIBPRUNE_DATA_DIR=/path/to/shared/data).")


def _offline_search(src: Source, data_dir: Path | None) -> str:
    """Where the offline copy of ``src`` was looked for, as a phrase for messages."""
    if data_dir is None:
        return ("no data directory was found (looked for " + ", ".join(map(str, _default_candidates()))
                + f"; {DATA_DIR_ENV} is not set)")
    if not data_dir.is_dir():
        return f"the data directory {data_dir} does not exist"
    missing = [str(p) for p in _offline_files(src.name, data_dir) if not p.is_file()]
    return "missing file(s): " + ", ".join(missing)


def _import_datasets(context: str) -> Any:
    try:
        return importlib.import_module("datasets")
    except ImportError as exc:
        raise ImportError(
            f"{context} needs the Hugging Face `datasets` package: `pip install datasets` (or "
            "`pip install calibprune[hub]`), and the Hugging Face hub must be reachable."
        ) from exc


def _finish(docs: Iterable[str | None], max_docs: int | None) -> list[str]:
    """Clean, drop empties and exact duplicates, stop at ``max_docs``."""
    out: list[str] = []
    seen: set[str] = set()
    for doc in docs:
        text = _clean(doc)
        if not text or text in seen:
            continue
        seen.add(text)
        out.append(text)
        if max_docs is not None and len(out) >= max_docs:
            break
    return out


def _load_hub(src: Source, loader: _Loader, max_docs: int | None, datasets_mod: Any) -> list[str]:
    required = _REQUIRED_HUB_SPLIT.get(src.name)
    if required is not None and src.hub_split != required:
        raise RuntimeError(f"Source {src.name!r} must use the hub split {required!r} (the others are evaluation "
                           f"data), got {src.hub_split!r}.")
    kwargs = dict(loader.hub_kwargs)
    if loader.streaming:
        kwargs["streaming"] = True
        if max_docs is None:
            max_docs = _STREAMING_DEFAULT_MAX_DOCS
            logger.info("source %r streams from the hub; stopping at %d documents (pass max_docs to change)",
                        src.name, max_docs)
    logger.info("loading source %r from the hub: %s config=%s split=%s", src.name, src.hub_id, src.hub_config,
                src.hub_split)
    records = datasets_mod.load_dataset(src.hub_id, src.hub_config, split=src.hub_split, **kwargs)
    if loader.hub_all is not None:
        return _finish(loader.hub_all(records), max_docs)
    assert loader.hub_record is not None
    return _finish((loader.hub_record(r) for r in records), max_docs)


def _read_offline(loader: _Loader, files: list[Path]) -> list[str]:
    """All documents of the offline files, any format problem raised as :class:`DataFileError` naming the file
    and line (the whole file is read, so a bad record anywhere is found, whatever ``max_docs`` is)."""
    assert loader.offline is not None
    token = _READING.set(None)
    try:
        return _finish(loader.offline(files), None)
    except UnicodeDecodeError as exc:
        where = _READING.get() or ", ".join(map(str, files))
        raise DataFileError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataFileError(f"{_READING.get() or files[0]}: not valid TSV ({exc})") from None
    finally:
        _READING.reset(token)


def _check_data_dir(src: Source, data_dir: str | os.PathLike[str] | None, source: str) -> Path | None:
    """The resolved data directory; an explicitly given one (argument or environment) must exist when the
    source could be read offline, so that a typo is reported instead of silently falling through to the hub."""
    resolved = resolve_data_dir(data_dir)
    explicit = data_dir is not None or bool(os.environ.get(DATA_DIR_ENV))
    if (explicit and source != "hub" and _LOADERS[src.name].offline is not None and resolved is not None
            and not resolved.is_dir()):
        raise DataUnavailableError(f"the data directory {resolved} (from {_data_dir_origin(data_dir)}) does not "
                                   f"exist{' or is not a folder' if resolved.exists() else ''}; point it at the "
                                   "folder that holds the offline copies")
    return resolved


def _hub_refusal(src: Source, resolved: Path | None, source: str) -> str | None:
    """Why the hub cannot serve ``src`` now (None when it can, or when offline mode is set: then the local
    `datasets` cache may serve it and any failure is reported by :func:`load_texts`)."""
    offline_flags = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
                     if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if offline_flags:
        return None
    reason = hub_unavailable_reason(datasets=True)
    if reason is None:
        return None
    if source == "hub" or _LOADERS[src.name].offline is None:
        return (f"source {src.name!r} is read from the Hugging Face hub ({src.hub_id}), but {reason}"
                + ("" if source == "hub" else " (it has no offline copy)"))
    return (f"source {src.name!r}: no offline copy ({_offline_search(src, resolved)}) and the Hugging Face hub "
            f"({src.hub_id}) cannot be used instead: {reason}. Point {DATA_DIR_ENV} or --data-dir at the offline "
            "copies, or connect to the hub")


def check_available(name: str, *, data_dir: str | os.PathLike[str] | None = None, source: str = "auto") -> str:
    """Say, without reading any data, whether ``name`` can be loaded: returns ``"offline"`` or ``"hub"``.

    Raises the same errors :func:`load_texts` would (unknown name, missing offline file, a given data directory
    that does not exist, no ``datasets`` for the hub) and :class:`DataUnavailableError` when the hub is needed
    but does not answer (a few seconds' TCP probe, once per process), so a command can fail before any work.
    """
    src = _check_name(name)
    if source not in ("auto", "offline", "hub"):
        raise ValueError(f"source must be 'auto', 'offline' or 'hub', got {source!r}")
    loader = _LOADERS[src.name]
    resolved = _check_data_dir(src, data_dir, source)
    if source != "hub" and loader.offline is not None and _offline_available(src.name, resolved):
        return "offline"
    if source == "offline":
        raise FileNotFoundError(_missing_offline_message(src, resolved))
    if loader.hub_record is None and loader.hub_all is None:
        raise ValueError(f"Source {src.name!r} has no hub loader; use source='offline'.")
    if importlib.util.find_spec("datasets") is None:
        context = f"Loading source {src.name!r} from the hub ({src.hub_id})"
        if source == "auto":
            context += " because its offline copy is unavailable [" + _missing_offline_message(src, resolved) + "]"
        _import_datasets(context)
    refusal = _hub_refusal(src, resolved, source)
    if refusal:
        raise DataUnavailableError(refusal)
    return "hub"


def load_texts(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    source: str = "auto",
    max_docs: int | None = None,
) -> list[str]:
    """Formatted documents of calibration source ``name``, in a deterministic order.

    ``source="offline"`` reads the copy under the data directory (see ``resolve_data_dir``), ``"hub"`` calls
    ``datasets.load_dataset`` with the source's hub id, config and split, and ``"auto"`` (default) reads offline
    when the files exist, else the hub. ``max_docs`` keeps the first documents only. Raises ``ValueError`` for an
    unknown name / ``source`` value or a source without a hub loader, ``FileNotFoundError`` when offline data is
    required but missing, ``ImportError`` when the hub is needed and ``datasets`` is not installed.
    """
    src = _check_name(name)
    if source not in ("auto", "offline", "hub"):
        raise ValueError(f"source must be 'auto', 'offline' or 'hub', got {source!r}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be a positive integer or None, got {max_docs!r}")
    loader = _LOADERS[src.name]
    resolved = _check_data_dir(src, data_dir, source)
    has_offline = loader.offline is not None and _offline_available(src.name, resolved)

    use_offline = source == "offline" or (source == "auto" and has_offline)
    if use_offline:
        if not has_offline:
            raise FileNotFoundError(_missing_offline_message(src, resolved))
        assert loader.offline is not None and resolved is not None
        files = _offline_files(src.name, resolved)
        logger.info("loading source %r offline from %s", src.name, ", ".join(map(str, files)))
        docs = _read_offline(loader, files)
        if max_docs is not None:
            docs = docs[:max_docs]
    else:
        if loader.hub_record is None and loader.hub_all is None:
            raise ValueError(f"Source {src.name!r} has no hub loader; use source='offline'.")
        context = f"Loading source {src.name!r} from the hub ({src.hub_id})"
        if source == "auto":
            context += " because its offline copy is unavailable [" + _missing_offline_message(src, resolved) + "]"
            if loader.offline is not None:
                logger.warning("source %r: no offline copy (%s); reading it from the hub", src.name,
                               _missing_offline_message(src, resolved))
        datasets_mod = _import_datasets(context)
        try:
            docs = _load_hub(src, loader, max_docs, datasets_mod)
        except (OSError, TimeoutError) as exc:  # ConnectionError, requests/HTTP errors, missing cache entries
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataUnavailableError(f"{context}: the hub (or the local `datasets` cache) failed: {first}") from exc
    logger.info("source %r: %d documents", src.name, len(docs))
    return docs
