"""``mamba-rt generate PKG --prompt TEXT``: stream a completion to stdout, tokens/s to stderr.

``--json`` prints one object instead: ``prompt_ids``, ``generated_ids``, ``text``, ``tokens_per_s``
(decode rate: tokens after the first over the decode time), ``prefill_s``, ``decode_s``,
``backend``. Nothing heavy is imported until ``run``.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", metavar="PKG", help="model package directory (from `mamba-rt export`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids (instead of --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", type=int, action="append", default=[], metavar="ID", help="stop token id (repeatable)")
    p.add_argument("--backend", default="auto", help="auto (default), onnxruntime, torch, tensorrt or tensorrt-rtx")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def run(args: argparse.Namespace) -> int:
    from mamba_rt._optional import default_device
    from mamba_rt.errors import InputError

    from .sampling import SamplingParams
    from .session import Session

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    prompt = args.prompt
    if args.prompt_ids is not None:
        try:
            prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}") from None
    device = args.device or default_device()
    with Session.open(args.package, backend=args.backend, device=device, max_batch=1) as s:
        print(f"mamba-rt: {s.backend.choice}: {s.describe()}", file=sys.stderr)
        prompt_ids = s.check_ids(s.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt).tolist()
        ids, text = [], []
        for tok in s.generate(prompt_ids, args.max_new_tokens, sampling, stop=args.stop):
            ids.append(tok.id)
            text.append(tok.text)
            if not args.json:
                sys.stdout.write(tok.text)
                sys.stdout.flush()
        st = s.stats
    tps = (len(ids) - 1) / st["decode_s"] if len(ids) > 1 and st["decode_s"] > 0 else 0.0
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "generated_ids": ids, "text": "".join(text),
                          "tokens_per_s": round(tps, 2), "prefill_s": round(st["prefill_s"], 6),
                          "decode_s": round(st["decode_s"], 6), "backend": s.backend.name}))
    else:
        sys.stdout.write("\n")
        print(f"mamba-rt: {len(ids)} tokens; decode {tps:.1f} tokens/s; prefill {len(prompt_ids)} tokens in "
              f"{st['prefill_s'] * 1e3:.1f} ms", file=sys.stderr)
    return 0
