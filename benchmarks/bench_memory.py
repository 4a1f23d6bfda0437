"""Peak memory of a prune against model size: streamed from disk (one decoder layer at a time) vs in memory.

Each measurement runs in a fresh child process, so its peak RSS (``ru_maxrss``) is that prune's alone; on a GPU the
peak device memory (``torch.cuda.max_memory_allocated``) is reported too. Models: SmolLM2-135M (the GGUF alias,
converted once to a safetensors checkpoint) and a random-initialised Llama-shaped model of 1.57B parameters
(hidden 2048, MLP 5632, 28 layers, vocabulary 32000, untied lm_head) built here from a ``LlamaConfig`` and saved
with ``save_pretrained`` in 1 GB shards (6.3 GB fp32; removed at the end unless ``--keep``). Calibration: random
token ids (a fixed seed) — the memory does not depend on which tokens they are.

Next to each measurement the script prints the prediction of the memory formula (README, "Scale out"):

    peak RSS ≈ R0 + E + L + S + A

    R0  the process with torch, transformers, calibprune and the model's code loaded: measured in the child after
        building the model on the meta device (no weights), before anything is read
    E   the weights outside the decoder layers (embeddings, final norm, an untied lm_head)
    L   one decoder layer's weights (the largest)
    S   that layer's statistics and solve: its Hessians, Σ_groups d² · 4 B, plus for the largest matrix the dense
        copy and the fp32 working copy (2 · rows · cols · 4 B) and the damped H and its inverse factor (2 · cols² · 4 B)
    A   the calibration activations, n · seqlen · hidden · (dtype bytes), on CPU (0 with --activations disk or
        when they live on the GPU)

    python benchmarks/bench_memory.py                       # both models, SparseGPT 60%, 8 x 128 tokens
    python benchmarks/bench_memory.py --models smollm2-135m --in-memory
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import RESULTS_DIR, environment, print_table, write_rows  # noqa: E402

LLAMA_1B5 = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                 tie_word_embeddings=False)


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _build_llama(folder: Path) -> None:
    """Random-initialised Llama-shaped model of ~1.57B parameters, saved sharded (runs in its own process)."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA_1B5)).eval()
    model.save_pretrained(folder, max_shard_size="1GB")
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    print(json.dumps({"parameters": n}))


def _formula(model, n: int, seqlen: int, activations: str) -> dict:
    """The terms of the memory formula for ``model`` (a streamed or loaded model; meta tensors count by size)."""
    from calibprune.pruning import find_decoder_layers, select_targets

    _, layers = find_decoder_layers(model)
    inside = {id(p) for p in layers.parameters()}
    outside = {id(p): p for p in model.parameters() if id(p) not in inside}
    E = sum(p.numel() * 4 for p in outside.values())
    layer = max(layers, key=lambda block: sum(p.numel() for p in block.parameters()))
    L = sum(p.numel() * 4 for p in layer.parameters())
    mods = select_targets(layer)
    # One Hessian per distinct input: q/k/v share the attention input, gate/up the MLP input.
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    groups = {shared.get(name.rsplit(".", 1)[-1], name): m.in_features for name, m in mods.items()}
    hessians = sum(d * d * 4 for d in groups.values())
    big = max(mods.values(), key=lambda m: m.in_features ** 2 + m.in_features * m.out_features)
    solve = 2 * big.out_features * big.in_features * 4 + 2 * big.in_features ** 2 * 4
    A = 0 if activations == "disk" else n * seqlen * model.config.hidden_size * 4
    return {"E_mb": E / 2**20, "L_mb": L / 2**20, "S_mb": (hessians + solve) / 2**20, "A_mb": A / 2**20}


def _child(args: argparse.Namespace) -> None:
    """One measurement: prints a JSON line with the peak RSS, the formula's terms, and timings."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from calibprune import make_config
    from calibprune.pruning import prune_and_save

    torch.set_grad_enabled(False)
    with init_empty_weights(include_buffers=False):  # R0: everything loaded but the weights
        probe = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    probe.tie_weights()  # a tied lm_head is the embedding: counted once in E
    terms = _formula(probe, args.n, args.seqlen, args.activations)
    del probe
    r0 = _rss_peak_bytes()
    device = torch.device(args.device)
    config = make_config(args.method, sparsity=0.6, activations=args.activations, device=args.device,
                         resume=args.resume and args.mode == "streamed")
    ids = torch.randint(0, args.vocab, (args.n, args.seqlen), generator=torch.Generator().manual_seed(0))
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.mode == "streamed":
        report = prune_and_save(args.model, ids, config, out, progress=False)
    else:
        # The whole model in memory (a random model has no tokenizer, so no load_model), then the same save.
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        report = prune_and_save(model, ids, config, out, progress=False)
    seconds = time.perf_counter() - t0
    row = {"mode": args.mode, "peak_rss_mb": _rss_peak_bytes() / 2**20, "R0_mb": r0 / 2**20, "seconds": seconds,
           "prune_seconds": report.seconds, "sparsity": report.sparsity} | terms
    if device.type == "cuda":
        row["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print("RESULT " + json.dumps(row))


def _run_child(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,llama-1.5b")
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--activations", default="cpu", choices=("device", "cpu", "disk"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--in-memory", action="store_true", help="also measure the in-memory prune (whole model loaded)")
    p.add_argument("--modes", default=None, help="comma list of streamed, in-memory (overrides --in-memory)")
    p.add_argument("--workdir", default=None, help="where the 1.5B checkpoint and the outputs go (default: a temp "
                   "folder under /work or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the 1.5B checkpoint")
    p.add_argument("--resume", action="store_true", help="continue a killed streamed measurement in --workdir (its "
                   "peak then covers the restored layers and the rest)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="streamed", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.modes and not set(args.modes.split(",")) <= {"streamed", "in-memory"}:
        p.error(f"--modes takes streamed and/or in-memory, got {args.modes!r}")
    if args.child:
        _child(args)
        return
    if args.build:
        _build_llama(Path(args.build))
        return
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for name in args.models.split(","):
            if name == "llama-1.5b":
                path = work / "llama-1.5b"
                if not (path / "config.json").is_file():
                    print(f"building {name} in {path} ({shutil.disk_usage(work).free / 2**30:.0f} GiB free) ...",
                          flush=True)
                    proc = subprocess.run([sys.executable, __file__, "--build", str(path)], capture_output=True,
                                          text=True)
                    if proc.returncode != 0:
                        raise RuntimeError(proc.stderr[-3000:])
                vocab = LLAMA_1B5["vocab_size"]
            else:
                from transformers import AutoConfig

                from calibprune.models import checkpoint_folder

                path = checkpoint_folder(name)
                vocab = AutoConfig.from_pretrained(path).vocab_size
            params = None
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(path)
            modes = args.modes.split(",") if args.modes else ["streamed"] + (["in-memory"] if args.in_memory else [])
            for mode in modes:
                out = work / f"out-{name}-{mode}"
                shutil.rmtree(out, ignore_errors=True)
                resumed = args.resume and mode == "streamed" and (work / f"{out.name}.calibprune-partial").is_dir()
                res = _run_child(["--child", "--mode", mode, "--model", str(path), "--vocab", str(vocab),
                                  "--out", str(out), "--n", str(args.n), "--seqlen", str(args.seqlen),
                                  "--method", args.method, "--activations", args.activations,
                                  "--device", args.device] + (["--resume"] if args.resume else []))
                if params is None:
                    from calibprune.pruning import load_streamed

                    params = sum(p.numel() for p in load_streamed(path).parameters())
                predicted = res["R0_mb"] + res["E_mb"] + res["L_mb"] + res["S_mb"] + res["A_mb"]
                if mode == "in-memory":
                    predicted = res["R0_mb"] + params * 4 / 2**20 + res["S_mb"] + res["A_mb"]
                row = {"model": name, "parameters_m": params / 1e6, "model_fp32_mb": params * 4 / 2**20,
                       "checkpoint_mb": _checkpoint_bytes(path) / 2**20, "layers": cfg.num_hidden_layers,
                       "method": args.method, "n": args.n, "seqlen": args.seqlen, "activations": args.activations,
                       "predicted_mb": predicted, "resumed": resumed} | res | environment(args.device)
                rows.append(row)
                write_rows("bench_memory", [row])  # each measurement is kept as soon as it is made
                shutil.rmtree(out, ignore_errors=True)
                print_table([row], ["model", "mode", "parameters_m", "model_fp32_mb", "peak_rss_mb", "predicted_mb",
                                    "R0_mb", "E_mb", "L_mb", "S_mb", "A_mb", "seconds"])
    finally:
        if not args.keep:
            shutil.rmtree(work / "llama-1.5b", ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(rows, ["model", "mode", "parameters_m", "model_fp32_mb", "peak_rss_mb", "predicted_mb", "R0_mb",
                       "E_mb", "L_mb", "S_mb", "A_mb", "seconds"])
    print(f"rows appended to {RESULTS_DIR / 'bench_memory.jsonl'}")


if __name__ == "__main__":
    main()
