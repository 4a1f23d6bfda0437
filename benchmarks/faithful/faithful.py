"""Run the authors' SparseGPT / Wanda / magnitude / RIA / ALPS code, or calibprune, on SmolLM2-135M; save every
Linear's weights.

Glue only; the authors' code is not part of calibprune. Get it yourself and point FAITHFUL_AUTHORS at a folder with
    sparsegpt/   the files llama.py, sparsegpt.py, modelutils.py, quant.py of github.com/IST-DASLab/sparsegpt
    wanda/lib/   the package lib/ of github.com/locuslab/wanda
    ria/lib/     the package lib/ of github.com/biomedical-cybernetics/Relative-importance-and-activation-pruning
    owl/lib/     the package lib/ of github.com/luuyin/OWL
    dsnot/lib/   the package lib/ of github.com/zyxxmu/DSnoT
    alps/        the files alps.py, llama.py, modelutils.py of github.com/mazumder-lab/ALPS
(untouched). What the glue changes to run them on transformers 5 and a CPU:
  * CPU: torch.cuda.synchronize -> no-op (their fasterprune calls it); Tensor.cuda -> identity for their
    prune_magnitude (it sorts on the GPU: `W_metric.flatten().cuda()`); device = cpu.
  * transformers 5: the decoder layer needs `position_embeddings=(cos, sin)`, which their Catcher does not keep.
    A forward hook on model.model.rotary_emb records (cos, sin) during the Catcher forward, and a forward pre-hook on
    every decoder layer supplies them when the caller did not pass them. Nothing else of the call changes.
  * Wanda: `get_loaders` is replaced by a function returning our token ids (one (inp, tar) per sequence, as
    their loader yields); `model.hf_device_map = {}` (their code reads it; set by accelerate's device_map="auto").
  * RIA: the same loader and device-map glue as Wanda (their prune_ria is Wanda's loop); Tensor.cuda -> identity
    (their threshold sorts on the GPU) and Tensor.to("cuda:*") -> cpu (their LSA runs on a hard-coded "cuda:7").
  * OWL and DSnoT: the loader and device-map glue of Wanda (their loops are Wanda's); OWL's magnitude-free path
    needs no device glue; DSnoT's defaults are their command line's (--initial_method wanda, --skip_layer mlp,
    --max_cycle_time 50, --update_threshold 0.1, --pow_of_var_regrowing 1, --without_same_sign True).
  * ALPS: their llama_sequential reads a global `args` (nsamples, method, sp, nm_n, nm_m), set here; alps.dev and
    the literal "cuda:0" of ALPS_admm map to cpu (Tensor.to glue); torch.cuda.synchronize -> no-op.

Usage (FAITHFUL_OUT: where runs go, default ./out; FAITHFUL_THREADS: torch threads, default 2 — compare only runs
made with the same thread count, BLAS/LAPACK round differently with it):
  python faithful.py calib                       # build the 16x256 C4 ids once (and 32x512 for timing)
  python faithful.py run NAME                    # one run -> out/NAME.pt (weights) + out/NAME.json (ppl, time)
NAMEs: see RUNS below.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("FAITHFUL_OUT", HERE / "out"))
AUTHORS = Path(os.environ.get("FAITHFUL_AUTHORS", HERE / "authors"))
THREADS = int(os.environ.get("FAITHFUL_THREADS", "2"))


def load():
    import calibprune

    torch.set_num_threads(THREADS)
    model, tok = calibprune.load_model("smollm2-135m")
    return model, tok


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.{n}": m.weight.detach().clone()
            for i, layer in enumerate(model.model.layers)
            for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def install_rope_glue(model) -> list:
    """transformers-5 glue: remember (cos, sin) of the model's rotary embedding and hand them to decoder layers
    called without position_embeddings (the authors' loops pass only attention_mask / position_ids)."""
    store: dict = {}

    def keep(_mod, _args, out):
        store["pe"] = out

    def give(_mod, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            kwargs["position_embeddings"] = store["pe"]
        return args, kwargs

    handles = [model.model.rotary_emb.register_forward_hook(keep)]
    handles += [layer.register_forward_pre_hook(give, with_kwargs=True) for layer in model.model.layers]
    return handles


def authors_sparsegpt(model, ids: torch.Tensor, sparsity: float, prunen: int, prunem: int) -> None:
    sys.path.insert(0, str(AUTHORS / "sparsegpt"))
    import llama as sg_llama  # IST-DASLab/sparsegpt llama.py (imports their sparsegpt.py, modelutils.py, quant.py)

    torch.cuda.synchronize = lambda *a, **k: None  # CPU glue: fasterprune ends with torch.cuda.synchronize()
    sg_llama.args = argparse.Namespace(nsamples=ids.shape[0], true_sequential=False, minlayer=-1, maxlayer=1000,
                                       prune_only="", invert=False, wbits=16, sparsity=sparsity, prunen=prunen,
                                       prunem=prunem, percdamp=0.01, blocksize=128)
    model.seqlen = ids.shape[1]
    dataloader = [(ids[i : i + 1], None) for i in range(ids.shape[0])]
    handles = install_rope_glue(model)
    try:
        sg_llama.llama_sequential(model, dataloader, torch.device("cpu"))
    finally:
        for h in handles:
            h.remove()


def _wanda_lib(ids: torch.Tensor):
    sys.path.insert(0, str(AUTHORS / "wanda"))
    import lib.prune as wp  # locuslab/wanda lib/prune.py (+ lib/layerwrapper.py)

    dataloader = [(ids[i : i + 1], None) for i in range(ids.shape[0])]
    wp.get_loaders = lambda *a, **k: (dataloader, None)  # data glue: our token ids instead of their C4 download
    return wp


def authors_wanda(model, tok, ids: torch.Tensor, sparsity: float, prune_n: int, prune_m: int) -> None:
    wp = _wanda_lib(ids)
    model.seqlen = ids.shape[1]
    model.hf_device_map = {}
    args = argparse.Namespace(nsamples=ids.shape[0], seed=0, use_variant=False, sparsity_ratio=sparsity)
    handles = install_rope_glue(model)
    try:
        wp.prune_wanda(args, model, tok, torch.device("cpu"), prune_n=prune_n, prune_m=prune_m)
    finally:
        for h in handles:
            h.remove()


def authors_magnitude(model, tok, ids: torch.Tensor, sparsity: float, prune_n: int, prune_m: int) -> None:
    wp = _wanda_lib(ids)
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU glue: their threshold sorts on the GPU
    try:
        args = argparse.Namespace(sparsity_ratio=sparsity)
        wp.prune_magnitude(args, model, tok, torch.device("cpu"), prune_n=prune_n, prune_m=prune_m)
    finally:
        torch.Tensor.cuda = cuda


class _CudaToCpu:
    """CPU glue for code that hard-codes CUDA devices: Tensor.cuda is the identity, Tensor.to("cuda:N") goes to cpu."""

    def __enter__(self):
        self.cuda, self.to = torch.Tensor.cuda, torch.Tensor.to
        original_to = self.to

        def to(t, *args, **kwargs):
            args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
            if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
                kwargs["device"] = "cpu"
            return original_to(t, *args, **kwargs)

        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.Tensor.to = to
        torch.cuda.synchronize = lambda *a, **k: None
        return self

    def __exit__(self, *exc):
        torch.Tensor.cuda, torch.Tensor.to = self.cuda, self.to


def authors_ria(model, tok, ids: torch.Tensor, sparsity: float, prune_n: int, prune_m: int,
                reallocation: bool = False, lsa: bool = False, importance_score: str = "sum") -> None:
    sys.path.insert(0, str(AUTHORS / "ria"))
    import lib.prune as rp  # RIA lib/prune.py (+ lib/layerwrapper.py)

    dataloader = [(ids[i : i + 1], None) for i in range(ids.shape[0])]
    rp.get_loaders = lambda *a, **k: (dataloader, None)  # data glue, as for Wanda
    model.seqlen = ids.shape[1]
    model.hf_device_map = {}
    args = argparse.Namespace(model="llama-smollm2", nsamples=ids.shape[0], seed=0, seqlen=ids.shape[1],
                              calib_dataset="c4", sparsity_ratio=sparsity, prune_method="ria", a=0.5,
                              reconstruction=False, gptq=False, reallocation=reallocation, lsa=lsa,
                              importance_score=importance_score, per_outneuron=False, semi_sparse_acc=False,
                              fast=False)
    handles = install_rope_glue(model)
    try:
        with _CudaToCpu():
            rp.prune_ria(args, model, tok, torch.device("cpu"), prune_n=prune_n, prune_m=prune_m)
    finally:
        for h in handles:
            h.remove()


def _lib(folder: str, module: str, ids: torch.Tensor, model):
    """Import ``<folder>/lib/<module>.py`` with the Wanda-style loader and device-map glue."""
    sys.path.insert(0, str(AUTHORS / folder))
    import importlib

    lib = importlib.import_module(f"lib.{module}")
    dataloader = [(ids[i : i + 1], None) for i in range(ids.shape[0])]
    lib.get_loaders = lambda *a, **k: (dataloader, None)
    model.seqlen = ids.shape[1]
    model.hf_device_map = {}
    return lib


def authors_owl(model, tok, ids: torch.Tensor, sparsity: float, m: float = 5.0, lmbda: float = 0.08) -> None:
    lib = _lib("owl", "prune_all", ids, model)
    args = argparse.Namespace(model="llama-smollm2", nsamples=ids.shape[0], seed=0, sparsity_ratio=sparsity,
                              use_variant=False, Hyper_m=m, Lamda=lmbda)
    handles = install_rope_glue(model)
    try:
        with _CudaToCpu():
            lib.prune_wanda_outlier(args, model, tok, torch.device("cpu"), prune_n=0, prune_m=0)
    finally:
        for h in handles:
            h.remove()


def authors_dsnot(model, tok, ids: torch.Tensor, sparsity: float, prune_n: int, prune_m: int) -> None:
    lib = _lib("dsnot", "prune", ids, model)
    args = argparse.Namespace(model="llama-smollm2", nsamples=ids.shape[0], seed=0, sparsity_ratio=sparsity,
                              initial_method="wanda", max_cycle_time=50, without_DSnoT=False, update_threshold=0.1,
                              pow_of_var_regrowing=1.0, pow_of_var_pruning=1.0, skip_layer="mlp",
                              skip_sub_layer="no_skip", without_same_sign=True, get_time_overhead=False)
    handles = install_rope_glue(model)
    try:
        with _CudaToCpu():
            lib.prune_DSnoT(args, model, tok, torch.device("cpu"), prune_n=prune_n, prune_m=prune_m)
    finally:
        for h in handles:
            h.remove()


def authors_alps(model, ids: torch.Tensor, sparsity: float, nm_n: int, nm_m: int) -> None:
    sys.path.insert(0, str(AUTHORS / "alps"))
    import alps as alps_mod  # mazumder-lab/ALPS alps.py
    import llama as alps_llama  # their llama.py (llama_sequential)

    alps_mod.dev = "cpu"
    alps_llama.args = argparse.Namespace(nsamples=ids.shape[0], method="ALPS", sp=sparsity, nm_n=nm_n, nm_m=nm_m)
    model.seqlen = ids.shape[1]
    dataloader = [(ids[i : i + 1], None) for i in range(ids.shape[0])]
    handles = install_rope_glue(model)
    try:
        with _CudaToCpu():
            alps_llama.llama_sequential(model, dataloader, torch.device("cpu"), nsamples=ids.shape[0])
    finally:
        for h in handles:
            h.remove()


def calibprune_run(model, ids, kind: str, **kw):
    import calibprune

    if kind in ("ria", "alps", "wanda+"):  # the generic entry with the method's config
        return calibprune.prune(model, ids, calibprune.make_config(kind.rstrip("+"), **kw), progress=False)
    fn = {"ref": calibprune.prune_sparsegpt_reference, "fused": calibprune.prune_sparsegpt_fused,
          "wanda": calibprune.prune_wanda, "magnitude": calibprune.prune_magnitude}[kind]
    report = fn(model, ids, progress=False, **kw) if "progress" in _params(fn) else fn(model, ids, **kw)
    return report


def _params(fn):
    import inspect

    return inspect.signature(fn).parameters


# name -> (who, what, kwargs)
RUNS = {
    "auth_sgpt_60": ("authors", "sparsegpt", dict(sparsity=0.6, prunen=0, prunem=0)),
    "auth_sgpt_24": ("authors", "sparsegpt", dict(sparsity=0.5, prunen=2, prunem=4)),
    "auth_wanda_60": ("authors", "wanda", dict(sparsity=0.6, prune_n=0, prune_m=0)),
    "auth_wanda_24": ("authors", "wanda", dict(sparsity=0.5, prune_n=2, prune_m=4)),
    "auth_mag_60": ("authors", "magnitude", dict(sparsity=0.6, prune_n=0, prune_m=0)),
    "auth_mag_24": ("authors", "magnitude", dict(sparsity=0.5, prune_n=2, prune_m=4)),
    "cp_ref_60": ("calibprune", "ref", dict(sparsity=0.6)),
    "cp_ref_24": ("calibprune", "ref", dict(pattern="2:4")),
    "cp_fused_60": ("calibprune", "fused", dict(sparsity=0.6, batch_size=1)),
    "cp_fused_torch_60": ("calibprune", "fused", dict(sparsity=0.6, batch_size=1, backend="torch")),
    "cp_fused_24": ("calibprune", "fused", dict(pattern="2:4", batch_size=1)),
    "cp_fused_torch_24": ("calibprune", "fused", dict(pattern="2:4", batch_size=1, backend="torch")),
    "cp_wanda_60": ("calibprune", "wanda", dict(sparsity=0.6)),
    "cp_wanda_24": ("calibprune", "wanda", dict(pattern="2:4")),
    "cp_mag_60": ("calibprune", "magnitude", dict(sparsity=0.6)),
    "cp_mag_24": ("calibprune", "magnitude", dict(pattern="2:4")),
    "cp_ref_60_bs8": ("calibprune", "ref", dict(sparsity=0.6, batch_size=8)),
    "cp_ref_24_bs8": ("calibprune", "ref", dict(pattern="2:4", batch_size=8)),
    "cp_fused_60_bs8": ("calibprune", "fused", dict(sparsity=0.6, batch_size=8)),
    "cp_fused_24_bs8": ("calibprune", "fused", dict(pattern="2:4", batch_size=8)),
    "cp_wanda_60_bs8": ("calibprune", "wanda", dict(sparsity=0.6, batch_size=8)),
    "cp_wanda_24_bs8": ("calibprune", "wanda", dict(pattern="2:4", batch_size=8)),
    "auth_ria_60": ("authors", "ria", dict(sparsity=0.6, prune_n=0, prune_m=0)),
    "auth_ria_24": ("authors", "ria", dict(sparsity=0.5, prune_n=2, prune_m=4)),
    "auth_ria_24_realloc": ("authors", "ria", dict(sparsity=0.5, prune_n=2, prune_m=4, reallocation=True)),
    "auth_ria_24_lsa": ("authors", "ria", dict(sparsity=0.5, prune_n=2, prune_m=4, reallocation=True, lsa=True)),
    "cp_ria_60": ("calibprune", "ria", dict(sparsity=0.6)),
    "cp_ria_24": ("calibprune", "ria", dict(pattern="2:4")),
    "cp_ria_24_realloc": ("calibprune", "ria", dict(pattern="2:4", reallocation=True)),
    "cp_ria_24_lsa": ("calibprune", "ria", dict(pattern="2:4", reallocation=True, lsa=True)),
    "auth_owl_70": ("authors", "owl", dict(sparsity=0.7)),
    "cp_owl_70": ("calibprune", "wanda+", dict(sparsity=0.7, sparsity_profile="owl")),
    "auth_dsnot_60": ("authors", "dsnot", dict(sparsity=0.6, prune_n=0, prune_m=0)),
    "auth_dsnot_70": ("authors", "dsnot", dict(sparsity=0.7, prune_n=0, prune_m=0)),
    "auth_dsnot_24": ("authors", "dsnot", dict(sparsity=0.5, prune_n=2, prune_m=4)),
    "cp_dsnot_60": ("calibprune", "wanda+", dict(sparsity=0.6, refine="dsnot")),
    "cp_dsnot_70": ("calibprune", "wanda+", dict(sparsity=0.7, refine="dsnot")),
    "cp_dsnot_24": ("calibprune", "wanda+", dict(pattern="2:4", refine="dsnot")),
    "cp_dsnot_60_stop": ("calibprune", "wanda+", dict(sparsity=0.6, refine="dsnot",
                                                      refine_options={"stop_when_exhausted": True})),
    "cp_dsnot_70_stop": ("calibprune", "wanda+", dict(sparsity=0.7, refine="dsnot",
                                                      refine_options={"stop_when_exhausted": True})),
    "auth_alps_60": ("authors", "alps", dict(sparsity=0.6, nm_n=0, nm_m=0)),
    "auth_alps_24": ("authors", "alps", dict(sparsity=0.5, nm_n=2, nm_m=4)),
    "cp_alps_60": ("calibprune", "alps", dict(sparsity=0.6)),
    "cp_alps_24": ("calibprune", "alps", dict(pattern="2:4")),
    # sample-parallel workers (each computing with one thread): compare with the authors' runs at FAITHFUL_THREADS=1
    "cp_ref_60_w2": ("calibprune", "ref", dict(sparsity=0.6, workers=2)),
    "cp_fused_60_w2": ("calibprune", "fused", dict(sparsity=0.6, batch_size=1, workers=2)),
    "cp_fused_24_w2": ("calibprune", "fused", dict(pattern="2:4", batch_size=1, workers=2)),
    "cp_wanda_60_w2": ("calibprune", "wanda", dict(sparsity=0.6, workers=2)),
    "cp_dsnot_60_w2": ("calibprune", "wanda+", dict(sparsity=0.6, refine="dsnot", workers=2)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["calib", "run", "dense"])
    ap.add_argument("name", nargs="?")
    a = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    import calibprune

    if a.cmd == "calib":
        _, tok = load()
        cs = calibprune.build_calibration(tok, "c4", n=16, seqlen=256, seed=0)
        torch.save(cs.ids if hasattr(cs, "ids") else calibprune.calibration.as_token_ids(cs), OUT / "calib_16x256.pt")
        cs = calibprune.build_calibration(tok, "c4", n=32, seqlen=512, seed=0)
        torch.save(cs.ids if hasattr(cs, "ids") else calibprune.calibration.as_token_ids(cs), OUT / "calib_32x512.pt")
        return
    model, tok = load()
    if a.cmd == "dense":
        ppl = calibprune.wikitext2_perplexity(model, tok, seqlen=512, max_windows=16)
        (OUT / "dense.json").write_text(json.dumps({"ppl": ppl, "calibprune": calibprune.__file__}))
        torch.save(linear_weights(model), OUT / "dense.pt")
        print("dense ppl", ppl)
        return
    who, what, kw = RUNS[a.name]
    ids = torch.load(OUT / "calib_16x256.pt")
    t0 = time.perf_counter()
    if who == "authors":
        if what == "sparsegpt":
            authors_sparsegpt(model, ids, **kw)
        elif what == "wanda":
            authors_wanda(model, tok, ids, **kw)
        elif what == "ria":
            authors_ria(model, tok, ids, **kw)
        elif what == "alps":
            authors_alps(model, ids, **kw)
        elif what == "owl":
            authors_owl(model, tok, ids, **kw)
        elif what == "dsnot":
            authors_dsnot(model, tok, ids, **kw)
        else:
            authors_magnitude(model, tok, ids, **kw)
    else:
        report = calibprune_run(model, ids, what, **kw)
        backends = getattr(report, "resolved_backends", None)
    seconds = time.perf_counter() - t0
    ppl = calibprune.wikitext2_perplexity(model, tok, seqlen=512, max_windows=16)
    info = {"name": a.name, "who": who, "what": what, "kwargs": kw, "seconds": seconds, "ppl": ppl,
            "threads": torch.get_num_threads(), "calibprune": calibprune.__file__,
            "resolved_backends": backends if who == "calibprune" else None}
    torch.save(linear_weights(model), OUT / f"{a.name}.pt")
    (OUT / f"{a.name}.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
