"""`megatron-ast`: thin command line over the library; bad input exits 2 with one line."""
from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_ast.errors import UsageError, report


def _cmd_assets(a: argparse.Namespace) -> None:
    from megatron_ast.assets import ensure_assets

    info = ensure_assets(verbose=not a.json)
    print(json.dumps(info, indent=None if a.json else 2))


def _cmd_preprocess(a: argparse.Namespace) -> None:
    from data_tools.preprocess import preprocess

    m = preprocess(a.input, a.output_dir, a.tokenizer, workers=a.workers, strict=a.strict,
                   eod_token=a.eod_token, domain=a.domain, fast_bpe=not a.no_fast_bpe, text_key=a.text_key,
                   max_tokens=a.max_tokens)
    if m:
        print(f"{len(m['shards'])} shards, {m['documents']} documents, {m['tokens']} tokens -> {a.output_dir}/manifest.json")


def _cmd_merge(a: argparse.Namespace) -> None:
    from data_tools.shards import merge

    m = merge(a.input, a.output, domain=a.domain)
    print(f"{m['documents']} documents, {m['tokens']} tokens -> {a.output}.bin/.idx")


def _cmd_inspect(a: argparse.Namespace) -> None:
    from data_tools.shards import inspect

    if a.adopt:
        from data_tools.shards import adopt

        if a.tokenizer is None:
            raise UsageError("--adopt checks the shards against the tokenizer they will be trained with: pass --tokenizer MODEL_DIR")
        m = adopt(a.path, a.tokenizer, a.domain, a.eod_token)
        where = a.path if os.path.isdir(a.path) else os.path.dirname(os.path.abspath(a.path))
        print(f"adopted {len(m['shards'])} shards, {m['documents']} documents, {m['tokens']} tokens -> {where}/manifest.json")
        return
    print(json.dumps(inspect(a.path, a.doc, a.tokens, a.tokenizer, a.verify), indent=2, ensure_ascii=False))


def _cmd_eval_ppl(a: argparse.Namespace) -> None:
    from megatron_ast.eval.perplexity import perplexity, token_windows
    from megatron_ast.modeling import load_causal_lm, check_model_dir

    check_model_dir(a.model)
    windows = token_windows(a.data, a.tokenizer or a.model, a.seq_len, a.max_windows, a.text_key)
    model = load_causal_lm(a.model, _dtype(a), adapter=a.adapter).to(_device(a))
    if a.expect:
        _expect(model, a.expect, a.model)
    result = perplexity(model, windows, batch_size=a.batch_size)
    print(json.dumps({"model": a.model, "slorb_adapter": _adapter_used_by(a.model, a.adapter), "seq_len": a.seq_len,
                      "perplexity": result}, indent=2))



def _device(a: argparse.Namespace) -> str:
    """--device, by default the GPU when there is one."""
    import torch

    return a.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(a: argparse.Namespace):
    import torch

    return getattr(torch, a.dtype)


def _adapter_used_by(model_dir: str, wanted: bool) -> str | None:
    from megatron_ast.sparsity.slorb_adapter import used

    return used(model_dir, wanted)


def _ignore_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="leave the weights whose parameter name matches REGEX dense (repeatable; routers, "
                        "embeddings, lm_head and norms are never pruned by default)")


def _expect(model, pattern: str, where: str) -> None:
    from megatron_ast.sparsity import SparsityPattern
    from megatron_ast.sparsity.sparse_weights import sparse_weights
    from megatron_ast.sparsity.validate import require_pattern

    require_pattern({w.name: w.matrices(model.get_parameter(w.name)).reshape(-1, w.in_features)
                     for w in sparse_weights(model)}, SparsityPattern.parse(pattern), where)


def _cmd_eval_lm_eval(a: argparse.Namespace) -> None:
    from megatron_ast.eval.harness import check_tasks, evaluate, table

    check_tasks(a.tasks, a.allow_hub)
    if a.expect:
        from megatron_ast.modeling import check_model_dir, load_causal_lm

        for m in a.model:
            check_model_dir(m)
            _expect(load_causal_lm(m, adapter=False), a.expect, m)
    results = evaluate(a.model, a.tasks, _local_tasks_dir(a.n), a.allow_hub, a.batch_size, a.limit, _device(a), a.adapter,
                       _dtype(a))
    print(table(results), file=sys.stderr)
    print(json.dumps({"tasks": a.tasks, "limit": a.limit, "results": results,
                      "slorb_adapters": {m: _adapter_used_by(m, a.adapter) for m in a.model}}, indent=2))


def _local_tasks_dir(n: int):
    from megatron_ast.assets import cache_root, ensure_assets
    from megatron_ast.eval.local_tasks import build_local_tasks

    corpus = ensure_assets()["corpus"]
    return build_local_tasks(cache_root() / "lm_eval_tasks" / f"n{n}", corpus["book"]["validation"],
                             corpus["github"]["validation"], n)


def _ignored_prune_flags(a: argparse.Namespace) -> list[str]:
    """The flags set away from their defaults that `--method` would ignore (magnitude reads no calibration data)."""
    calibrated = a.method != "magnitude" or a.slorb_group is not None
    obs = a.method in ("sparsegpt", "sparsellm")
    used = {"calib": calibrated, "nsamples": calibrated, "seqlen": calibrated, "seed": calibrated,
            "tokenizer": calibrated, "text_key": calibrated, "blocksize": obs, "damp": obs or a.slorb_group is not None,
            "scope": obs and a.pattern == "unstructured", "expert_calibration": calibrated,
            "expert_min_tokens": calibrated,
            **{f"sparsellm_{k}": a.method == "sparsellm" for k in ("rounds", "alpha", "beta", "gamma")}}
    return [f"--{k.replace('_', '-')}" for k, on in used.items() if not on and getattr(a, k) != a.default_of(k)]


def _cmd_prune(a: argparse.Namespace) -> None:
    from megatron_ast.pruning.api import prune_to_dir
    from megatron_ast.pruning.pipeline import PruneConfig, SparseLLMConfig
    from megatron_ast.sparsity import SparsityPattern
    from megatron_ast.sparsity.sparse_weights import check_ignore

    if ignored := _ignored_prune_flags(a):
        one = len(ignored) == 1
        raise UsageError(f"{', '.join(ignored)} mean{'s' if one else ''} nothing to --method {a.method} with --pattern "
                         f"{a.pattern}: drop {'it' if one else 'them'}, or choose a method that uses "
                         f"{'it' if one else 'them'}")
    cfg = PruneConfig(a.method, SparsityPattern.parse(a.pattern, a.sparsity), a.blocksize, a.damp, _device(a),
                      SparseLLMConfig(a.sparsellm_rounds, a.sparsellm_alpha, a.sparsellm_beta, a.sparsellm_gamma),
                      prune_head=a.prune_head, prune_embeddings=a.prune_embeddings, scope=a.scope,
                      slorb_group=a.slorb_group, ignore=check_ignore(a.ignore),
                      expert_calibration=a.expert_calibration, expert_min_tokens=a.expert_min_tokens)
    r = prune_to_dir(a.model, a.out, cfg, a.calib, a.nsamples, a.seqlen, a.seed, a.tokenizer, a.text_key)
    print(json.dumps({k: v for k, v in r.items() if k != "layers"}, indent=2))


def _single_process_world() -> None:
    """No launcher set a world (plain `megatron-ast train`): one rank, on this host, instead of DeepSpeed's MPI
    discovery (which needs mpi4py and an MPI launcher)."""
    import socket

    from megatron_ast.training.plan import resolve_world

    if resolve_world()["world_size"] == 1 and "RANK" not in os.environ and "MASTER_ADDR" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        print("[train] no launcher: one process (world size 1)", file=sys.stderr)


def _cmd_train(a: argparse.Namespace) -> None:
    from megatron_ast.training.config import load_config

    cfg = load_config(a.config)  # validated before any rank starts DeepSpeed
    cfg.trust_checkpoint = cfg.trust_checkpoint or a.trust_checkpoint
    if a.resume is not None:
        cfg.resume = a.resume
        cfg.validate().resolve_paths()
    if a.dry_run:
        from megatron_ast.training.plan import plan

        print(json.dumps(plan(cfg, a.world_size, a.nodes, a.gpu_gib or None), indent=2))
        return
    if a.world_size is not None or a.nodes is not None:
        raise UsageError("--world-size and --nodes plan another world with --dry-run; to train on N ranks, start "
                         "under a launcher: deepspeed, torchrun, srun or mpirun (launch/)")
    _single_process_world()
    import torch.distributed as dist

    from megatron_ast import distributed
    from megatron_ast.training.trainer import Trainer

    try:
        summary = Trainer(cfg).fit()
        if dist.get_rank() == 0:
            print(json.dumps(summary, indent=2))
        distributed.barrier()  # all ranks tear down together: a gloo rank whose peers are gone may abort at exit
    except UsageError as e:
        if dist.is_initialized() and dist.get_world_size() > 1:
            # the others may be blocked in a collective: end them too, then undo what they were writing
            distributed.fail_every_rank(str(e), e.cleanup)
        raise
    finally:  # also after SIGUSR1's save (SystemExit 138): a clean teardown, which MPI launchers expect
        distributed.stop_watching()
        if dist.is_initialized():
            dist.destroy_process_group()


def _cmd_quantize(a: argparse.Namespace) -> None:
    from megatron_ast.quantization.api import quantize_dir
    from megatron_ast.quantization.groupwise import QuantSpec
    from megatron_ast.sparsity.sparse_weights import check_ignore

    r = quantize_dir(a.model, a.out, QuantSpec(a.bits, a.group_size), a.method, a.calib, a.nsamples, a.seqlen,
                     a.seed, _device(a), fmt=a.format, adapter=a.adapter, text_key=a.text_key,
                     ignore=check_ignore(a.ignore))
    print(json.dumps({k: v for k, v in r.items() if k != "layers"}, indent=2))


def _cmd_export(a: argparse.Namespace) -> None:
    from megatron_ast.export.hf import export_checkpoint

    print(json.dumps(export_checkpoint(a.checkpoint, a.out, a.dtype, a.format, a.trust_checkpoint,
                                                   a.max_shard_size), indent=2))


def _cmd_init(a: argparse.Namespace) -> None:
    from pathlib import Path

    from megatron_ast.training.config import load_config
    from megatron_ast.training.plan import plan
    from megatron_ast.training.recipe import write_run_dir

    made = write_run_dir(a.model, a.pruned, a.out, a.gpus_per_node, a.nodes, a.seq_len, int(a.tokens),
                         int(a.global_batch_tokens), a.train, a.validation)
    dry = plan(load_config(Path(a.out) / "run.yaml"), made["world_size"], a.nodes, a.gpu_gib)
    print(json.dumps({"init": made, "dry_run": dry}, indent=2))
    print(f"wrote {a.out}/run.yaml, ds_config.json and the launchers: {made['steps']} steps of "
          f"{made['tokens_per_step']:,} tokens on {made['world_size']} GPUs; check it with `megatron-ast train --config "
          f"{a.out}/run.yaml --dry-run --world-size {made['world_size']} --nodes {a.nodes}`", file=sys.stderr)


def _cmd_checkpoint_universal(a: argparse.Namespace) -> None:
    from pathlib import Path

    from megatron_ast.training import checkpoint

    tag = Path(a.checkpoint)
    checkpoint.require_complete(tag, "convert another checkpoint")
    out = checkpoint.convert_universal(tag, a.trust_checkpoint)
    print(json.dumps({"checkpoint": str(tag), "universal": str(out)}, indent=2))


def _cmd_quickstart(a: argparse.Namespace) -> None:
    from megatron_ast.quickstart import run

    run(a.out, max_windows=a.max_windows, lm_eval_n=a.lm_eval_n, stop_after=a.stop_after)


TRUST_HELP = ("unpickle DeepSpeed files that the weights-only loader refuses (unpickling can run code: only for "
              "checkpoints from someone you trust)")


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-ast", description=__doc__)
    # the deepspeed launcher puts --local_rank=N before the subcommand; torchrun/srun set LOCAL_RANK instead
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("assets", help="fetch and convert the reference model and corpus (cached)")
    s.add_argument("--json", action="store_true", help="print only the paths, as one JSON object")
    s.set_defaults(fn=_cmd_assets)

    s = sub.add_parser("preprocess", help="jsonl(.gz/.zst), parquet, Arrow, HF dataset dirs -> Megatron .bin/.idx shards")
    s.add_argument("--input", nargs="+", required=True,
                   help="jsonl(.gz/.zst), .parquet or .arrow files, directories of them, Dataset.save_to_disk dirs, "
                        "or local Hugging Face dataset dirs (a README.md card with configs)")
    s.add_argument("--text-key", default="text", help="the column (jsonl: field) holding the text")
    s.add_argument("--max-tokens", type=_positive, help="stop at the document boundary where the tokens written "
                   "would pass this (MPI ranks split it)")
    s.add_argument("--output-dir", required=True)
    s.add_argument("--tokenizer", required=True, help="HF tokenizer dir or SentencePiece .model")
    s.add_argument("--workers", type=_positive, default=1, help="processes on this node")
    s.add_argument("--strict", action="store_true", help="a bad line or row is an error instead of being skipped")
    s.add_argument("--eod-token", help="end-of-document token (default: the tokenizer's eos)")
    s.add_argument("--domain", help="domain of every input (default: each file's parent dir name)")
    s.add_argument("--no-fast-bpe", action="store_true",
                   help="encode with tokenizers only (default: tiktoken for byte-level BPE, same ids, ~5x faster)")
    s.set_defaults(fn=_cmd_preprocess)

    s = sub.add_parser("merge", help="concatenate token shards into one")
    s.add_argument("--input", nargs="+", required=True, help="shard prefixes or shard dirs")
    s.add_argument("--output", required=True, help="output shard prefix (DIR/NAME)")
    s.add_argument("--domain", help="domain of the merged shard (needed when inputs span domains)")
    s.set_defaults(fn=_cmd_merge)

    s = sub.add_parser("inspect", help="counts of token shards; decode the first tokens of a document")
    s.add_argument("path", help="shard prefix or shard dir")
    s.add_argument("--doc", type=int, default=0)
    s.add_argument("--tokens", type=_positive, default=32)
    s.add_argument("--tokenizer", help="decode with this tokenizer")
    s.add_argument("--verify", action="store_true", help="read every shard whole: its index structure and the "
                   "sha256 its sidecar records (merge and train always do)")
    s.add_argument("--adopt", action="store_true", help="shards made by Megatron-LM's preprocess_data.py: check every "
                   "id against --tokenizer, the dtype and the EOD ending each document, then write sidecars and manifest")
    s.add_argument("--domain", help="with --adopt: the domain of every shard (default: its name without _text_document)")
    s.add_argument("--eod-token", help="with --adopt: the end-of-document token (default: the tokenizer's eos)")
    s.set_defaults(fn=_cmd_inspect)

    ev = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_command", required=True)
    s = ev.add_parser("ppl", help="perplexity over non-overlapping windows")
    s.add_argument("--model", required=True, help="local HF model dir")
    s.add_argument("--data", nargs="+", required=True, help="token-shard dirs, jsonl/parquet/arrow/text files, HF dataset dirs")
    s.add_argument("--text-key", default="text", help="the column (jsonl: field) of raw documents that holds the text")
    s.add_argument("--tokenizer", help="default: the model dir")
    s.add_argument("--seq-len", type=_positive, default=512)
    s.add_argument("--max-windows", type=_positive, help="per domain, evenly spaced (default: all)")
    s.add_argument("--batch-size", type=_positive, default=4)
    s.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is a GPU)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    s.add_argument("--expect", help="N:M pattern every decoder Linear must hold (e.g. 2:4), checked before evaluating")
    s.add_argument("--no-adapter", dest="adapter", action="store_false",
                   help="leave a dir's SLoRB adapter (slorb_adapter/) off: measure the 2:4 base alone")
    s.set_defaults(fn=_cmd_eval_ppl)
    s = ev.add_parser("lm-eval", help="LM Evaluation Harness tasks (offline local tasks by default), models side by side")
    s.add_argument("--model", nargs="+", required=True, help="local HF model dirs (dense, pruned, exported, ...)")
    s.add_argument("--tasks", nargs="+", default=["shakespeare_cloze", "code_next_line"],
                   help="local tasks, or standard lm-eval task names with --allow-hub")
    s.add_argument("--allow-hub", action="store_true", help="let standard tasks download their datasets")
    s.add_argument("--n", type=_positive, default=200, help="examples per local task (built once, cached)")
    s.add_argument("--limit", type=_positive, help="evaluate only the first LIMIT examples of each task")
    s.add_argument("--batch-size", type=_positive, default=8)
    s.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is a GPU)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    s.add_argument("--expect", help="N:M pattern every decoder Linear must hold (e.g. 2:4), checked first")
    s.add_argument("--no-adapter", dest="adapter", action="store_false",
                   help="leave a dir's SLoRB adapter (slorb_adapter/) off: measure the 2:4 base alone")
    s.set_defaults(fn=_cmd_eval_lm_eval)

    s = sub.add_parser("prune", help="one-shot pruning to N:M or unstructured sparsity")
    s.add_argument("--model", required=True, help="local HF model dir")
    s.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt", "sparsellm"])
    s.add_argument("--pattern", default="2:4", help="N:M (2:4, 4:8, ...) or 'unstructured'")
    s.add_argument("--sparsity", type=float, help="fraction of zeros for --pattern unstructured (default 0.5)")
    s.add_argument("--calib", nargs="+", help="token-shard dirs, jsonl/parquet/arrow/text files, HF dataset dirs")
    s.add_argument("--text-key", default="text", help="the column (jsonl: field) of raw documents that holds the text")
    s.add_argument("--nsamples", type=_positive, default=128)
    s.add_argument("--seqlen", type=_positive, default=2048)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output model dir (must not exist)")
    s.add_argument("--tokenizer", help="default: the model dir")
    s.add_argument("--device", help="where each layer is pruned: cpu, cuda, cuda:1 ... (default: cuda when there is a GPU)")
    s.add_argument("--blocksize", type=_positive, default=128, help="SparseGPT column block")
    s.add_argument("--damp", type=float, default=0.01, help="Hessian damping, relative to mean(diag H)")
    s.add_argument("--scope", choices=["row", "block"], default="row",
                   help="SparseGPT/SparseLLM unstructured threshold: each row exactly --sparsity (row) or one "
                        "threshold per --blocksize columns over all rows (block, as the reference code)")
    s.add_argument("--slorb-group", type=_positive, default=None, metavar="K",
                   help="also fit a SLoRB branch (group K) per decoder Linear by least squares on the calibration "
                        "inputs and write it as slorb_adapter/ (AST's slorb.init: fitted starts from it)")
    s.add_argument("--prune-head", action="store_true",
                   help="also prune lm_head (by --method, calibrated on the final hidden states)")
    s.add_argument("--prune-embeddings", action="store_true",
                   help="also prune the input embedding (by magnitude); tied to lm_head it is the same tensor")
    _ignore_flag(s)
    s.add_argument("--expert-calibration", choices=["routed", "all"], default="routed",
                   help="MoE: each expert's calibration inputs are the tokens its router sends it (routed), or every "
                        "token (all; the layer's output is left as routed)")
    s.add_argument("--expert-min-tokens", type=int, default=16, metavar="N",
                   help="MoE: an expert routed fewer than N calibration tokens is pruned by magnitude (counted in "
                        "sparsity_report.json)")
    s.add_argument("--sparsellm-rounds", type=_positive, default=4)
    s.add_argument("--sparsellm-alpha", type=float, default=5.0)
    s.add_argument("--sparsellm-beta", type=float, default=5.0)
    s.add_argument("--sparsellm-gamma", type=float, default=5.0)
    s.set_defaults(fn=_cmd_prune, default_of=s.get_default)

    s = sub.add_parser("train", help="AST (or the naive baseline) on ZeRO-3; start under deepspeed/torchrun/srun")
    s.add_argument("--config", required=True, help="run.yaml (see launch/run_ast.yaml)")
    s.add_argument("--resume", help="none | auto (the newest complete checkpoint in output_dir) | a checkpoint dir; "
                                    "overrides run.yaml's resume")
    s.add_argument("--dry-run", action="store_true",
                   help="print the resolved world, batch arithmetic and ZeRO-3 memory estimate; start nothing")
    s.add_argument("--world-size", type=_positive, help="with --dry-run: plan for this many ranks")
    s.add_argument("--nodes", type=_positive, help="with --dry-run: ... on this many nodes")
    s.add_argument("--gpu-gib", type=float, default=80.0,
                   help="with --dry-run: each GPU's memory, for teacher.zero auto (default 80; 0: CPU ranks)")
    s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("quantize", help="int4/int8 group-wise on top of a 2:4 model (GPTQ or RTN); zeros stay zero")
    s.add_argument("--model", required=True, help="a 2:4 model dir with masks.safetensors (from prune or export)")
    s.add_argument("--bits", type=int, choices=[4, 8], default=4)
    s.add_argument("--group-size", type=_positive, default=128)
    s.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    s.add_argument("--calib", nargs="+", help="token-shard dirs, jsonl/parquet/arrow/text files, HF dataset dirs (gptq)")
    s.add_argument("--text-key", default="text", help="the column (jsonl: field) of raw documents that holds the text")
    s.add_argument("--nsamples", type=_positive, default=128)
    s.add_argument("--seqlen", type=_positive, default=2048)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is a GPU)")
    s.add_argument("--format", choices=["hf", "compressed-tensors"], default="hf",
                   help="hf: dequantized safetensors + our packed 2:4 file; compressed-tensors: pack-quantized "
                        "W4A16/W8A16, what vLLM and transformers load (compressed-tensors 0.20)")
    s.add_argument("--out", required=True, help="output model dir (must not exist)")
    s.add_argument("--no-adapter", dest="adapter", action="store_false",
                   help="leave a dir's SLoRB adapter (slorb_adapter/) off: quantize and write the 2:4 base alone")
    _ignore_flag(s)
    s.set_defaults(fn=_cmd_quantize)

    s = sub.add_parser("export", help="a training checkpoint -> Hugging Face safetensors (W*M) + masks + SLoRB as PEFT LoRA")
    s.add_argument("checkpoint", help="a complete checkpoint dir: <output_dir>/checkpoints/stepN")
    s.add_argument("--out", required=True, help="output model dir (must not exist)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the run's (bf16 for a bf16 run)")
    s.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB; e.g. 500MB, 2GiB)")
    s.add_argument("--format", choices=["hf", "compressed-tensors"], default="hf",
                   help="hf: dense safetensors (W*M), what transformers and vLLM load; compressed-tensors: refused "
                        "(float 2:4 has no format a current stack loads: quantize --format compressed-tensors)")
    s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("init", help="a run dir for a model and a world: run.yaml (the measured defaults), a DeepSpeed "
                                    "JSON with the batch arithmetic, the launch scripts; prints its dry run")
    s.add_argument("--model", required=True, help="the dense HF model dir (teacher)")
    s.add_argument("--pruned", required=True, help="its 2:4 prune: `megatron-ast prune --method sparsegpt --slorb-group "
                                                   "16 ...` output (the student's start)")
    s.add_argument("--out", required=True, help="the run dir to write (must not exist)")
    s.add_argument("--gpus-per-node", type=_positive, default=8)
    s.add_argument("--nodes", type=_positive, default=1)
    s.add_argument("--seq-len", type=_positive, default=1024)
    s.add_argument("--tokens", type=float, default=1e9, help="training tokens (default 1e9)")
    s.add_argument("--global-batch-tokens", type=float, default=2**19, help="tokens per optimizer step (default 2^19)")
    s.add_argument("--train", nargs="+", help="token-shard dirs (default: a placeholder to edit)")
    s.add_argument("--validation", nargs="+", help="token-shard dirs for eval")
    s.add_argument("--gpu-gib", type=float, default=80.0, help="each GPU's memory, for the dry run (default 80)")
    s.set_defaults(fn=_cmd_init)

    ck = sub.add_parser("checkpoint", help="training checkpoints").add_subparsers(dest="checkpoint_command", required=True)
    s = ck.add_parser("universal", help="convert a checkpoint to DeepSpeed's universal form (resume on another "
                                        "world size), once, before the relaunch")
    s.add_argument("checkpoint", help="a complete checkpoint dir: <output_dir>/checkpoints/stepN")
    s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    s.set_defaults(fn=_cmd_checkpoint_universal)

    s = sub.add_parser("quickstart", help="the main job end to end on the reference model and corpus")
    s.add_argument("--out", default="runs/quickstart")
    s.add_argument("--max-windows", type=_positive, default=32, help="eval windows per domain")
    s.add_argument("--lm-eval-n", type=_positive, default=100, help="examples per local lm-eval task")
    s.add_argument("--stop-after", metavar="STAGE", help="end after this stage (assets, preprocess, eval_dense, prune, "
                   "...; the report names them)")
    s.set_defaults(fn=_cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except UsageError as e:
        report(str(e))
        return 2
    except Exception as e:
        from megatron_ast.fsutil import no_space, out_of_space

        if not out_of_space(e):
            raise
        out = next((getattr(args, k) for k in ("out", "output_dir", "output") if getattr(args, k, None)), ".")
        report(no_space(out))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
