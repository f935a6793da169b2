"""Train the shipped demo models, seeded and reproducible: ``python -m mamba_rt.demo_train lm|copying``.

Both models are the one reference network, :class:`mamba_rt.exporters.model.MambaLM`, with its
reference ops (pure PyTorch, differentiable; ``selective_scan_ref`` precomputes exp(dt A) and dt B u
for blocks of steps so each step is one multiply-add and one small product), and the whole training
step (forward, backward, clipping, AdamW) is captured in one CUDA graph.

* ``lm``: a byte-level Mamba-1 (vocab 256) on the Python standard library's own ``*.py`` files
  (``sysconfig.get_paths()["stdlib"]``, sorted). A file is held out when the SHA-256 of its path relative
  to the stdlib root, taken mod 100, is below ``--heldout-percent``. Writes a mamba_ssm checkpoint,
  ``log.json`` (bits/byte on train and held-out text, steps, tokens, time, device) and
  ``heldout_sample.txt`` (whole held-out files, for the CPU check in CI).
* ``copying``: the selective-copying task of the Mamba paper (section 4.1), see :func:`copying_batch`.

Every random draw comes from generators seeded by ``--seed``; ``--steps`` fixes the schedule (a wall-clock
``--max-seconds`` stops a run early and saves what it has; ``log.json`` then says so). Needs a CUDA GPU
for sensible speed (``--device cpu`` works for smoke tests).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mamba_rt._gc import collector_paused
from mamba_rt.config import MambaConfig
from mamba_rt.exporters.model import REF_OPS, MambaLM

LOG2E = 1.0 / math.log(2.0)

LM_CONFIG = MambaConfig(d_model=384, n_layer=6, vocab_size=256, d_state=16, d_conv=4, expand=2,
                        pad_vocab_size_multiple=8)

# selective copying: token 0 is the blank (noise), 1 the marker that asks for the next data token,
# 2..15 the data tokens
COPY_VOCAB = 16
COPY_BLANK, COPY_MARKER, COPY_FIRST_DATA = 0, 1, 2
COPY_REGION = 128
COPY_TOKENS = 16
COPY_CONFIG = MambaConfig(d_model=64, n_layer=2, vocab_size=COPY_VOCAB, d_state=16, d_conv=4, expand=2)


# -- model init (mamba_ssm's recipe) ------------------------------------------------------------------
def init_model(config: MambaConfig, device, seed: int) -> MambaLM:
    torch.manual_seed(seed)
    model = MambaLM(config, torch.float32, device=device, ops=REF_OPS)
    n = config.d_state
    with torch.no_grad():
        torch.nn.init.normal_(model.backbone.embedding.weight, std=0.02)
        for layer in model.backbone.layers:
            m = layer.mixer
            std = config.dt_rank ** -0.5
            torch.nn.init.uniform_(m.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(config.d_inner, device=device) * (math.log(0.1) - math.log(1e-3))
                           + math.log(1e-3)).clamp(min=1e-4)
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            a = torch.arange(1, n + 1, dtype=torch.float32, device=device)
            m.A_log.copy_(torch.log(a).repeat(config.d_inner, 1))
            m.D.fill_(1.0)
            # GPT-2 style rescale of the residual branch output
            m.out_proj.weight.mul_(1.0 / math.sqrt(config.n_layer))
    return model


def canonical_weights(model: MambaLM) -> dict:
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}


# -- data ---------------------------------------------------------------------------------------------
def stdlib_files(root: str | None = None) -> list[tuple[str, bytes]]:
    """(path relative to the stdlib root, bytes) of every ``*.py`` of the standard library, sorted."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(base.rglob("*.py")):
        rel = p.relative_to(base).as_posix()
        if "site-packages" in rel or "dist-packages" in rel or not p.is_file():
            continue
        out.append((rel, p.read_bytes()))
    return out


def is_heldout(rel: str, percent: int) -> bool:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 100 < percent


def split_corpus(files, percent: int):
    train = [(r, b) for r, b in files if not is_heldout(r, percent)]
    held = [(r, b) for r, b in files if is_heldout(r, percent)]
    return train, held


def heldout_sample(held, target_bytes: int, max_file: int = 12_000) -> tuple[bytes, list[str]]:
    """Whole held-out files (the smaller ones, in hash order) concatenated up to ``target_bytes``."""
    order = sorted(held, key=lambda rb: hashlib.sha256(rb[0].encode()).hexdigest())
    parts, names, size = [], [], 0
    for rel, b in order:
        if len(b) > max_file or len(b) < 500:
            continue
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        parts.append(b)
        names.append(rel)
        size += len(b)
        if size >= target_bytes:
            break
    return b"".join(parts), names


def eval_chunks(data: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping (n, length) windows of a byte stream (the tail that does not fill one is dropped)."""
    n = data.numel() // length
    return data[: n * length].reshape(n, length)


@torch.no_grad()
def bits_per_byte(model: MambaLM, chunks: torch.Tensor, batch: int = 64) -> float:
    """Mean bits per predicted byte over ``chunks`` (n, L) int64: each chunk starts from a zero state and
    predicts its bytes 1..L-1 from the ones before."""
    total, count = 0.0, 0
    for i in range(0, chunks.shape[0], batch):
        x = chunks[i:i + batch]
        logits, _ = model(x[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += x[:, 1:].numel()
    return total / count * LOG2E


# -- selective copying --------------------------------------------------------------------------------
def copying_batch(n: int, generator: torch.Generator, region: int = COPY_REGION, tokens: int = COPY_TOKENS,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` selective-copying instances: ``tokens`` data tokens (2..15) at random distinct positions of a
    blank region of length ``region``, then ``tokens`` markers. Returns (ids (n, region + tokens) int64,
    answers (n, tokens) int64): the logits at the i-th marker must predict the i-th data token."""
    g = generator
    pos = torch.rand(n, region, generator=g, device=device).argsort(-1)[:, :tokens].sort(-1).values
    data = torch.randint(COPY_FIRST_DATA, COPY_VOCAB, (n, tokens), generator=g, device=device)
    ids = torch.full((n, region + tokens), COPY_BLANK, dtype=torch.int64, device=device)
    ids.scatter_(1, pos, data)
    ids[:, region:] = COPY_MARKER
    return ids, data


@torch.no_grad()
def copying_accuracy(model: MambaLM, ids: torch.Tensor, answers: torch.Tensor, batch: int = 512):
    """(per-token accuracy, predictions (n, tokens)) of greedy predictions at the marker positions."""
    k = answers.shape[1]
    preds = []
    for i in range(0, ids.shape[0], batch):
        logits, _ = model(ids[i:i + batch])
        preds.append(logits[:, -k:].argmax(-1))
    pred = torch.cat(preds)
    return float((pred == answers).float().mean()), pred


# -- the training loop --------------------------------------------------------------------------------
class GraphedStep:
    """One training step (forward, loss, backward, clip, AdamW) captured in a CUDA graph; eager on CPU.
    ``loss_fn(model, x, y) -> loss`` reads only the static inputs ``x`` and ``y``."""

    def __init__(self, model, loss_fn, x, y, lr, wd, clip, device):
        self.model, self.loss_fn, self.clip = model, loss_fn, clip
        self.x, self.y = x, y
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        cuda = torch.device(device).type == "cuda"
        self.lr = torch.tensor(lr, device=device) if cuda else lr
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}],
                                     lr=self.lr, betas=(0.9, 0.95), eps=1e-8, capturable=cuda, foreach=True)
        self.params = list(model.parameters())
        self.graph = None
        self.cuda = cuda

    def set_lr(self, lr: float):
        for g in self.opt.param_groups:
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr

    def _eager(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, self.x, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        return loss.detach()

    def warmup_and_capture(self, warm_steps: int, next_batch):
        """``warm_steps`` eager steps on a side stream (real updates), then the capture (no update)."""
        if not self.cuda:
            return
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warm_steps):
                next_batch()
                self._eager()
        torch.cuda.current_stream().wait_stream(s)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with collector_paused(), torch.cuda.graph(self.graph):
            self.loss = self.loss_fn(self.model, self.x, self.y)
            self.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
            self.opt.step()

    def __call__(self):
        if self.graph is None:
            return self._eager()
        self.graph.replay()
        return self.loss


def lr_at(step: int, steps: int, peak: float, warmup: int, final_frac: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, loss_fn, next_batch, x, y, steps, lr, warmup, wd, clip, max_seconds, device, log_every, log):
    step_fn = GraphedStep(model, loss_fn, x, y, lr, wd, clip, device)
    t0 = time.perf_counter()
    warm = 3 if step_fn.cuda else 0
    step_fn.set_lr(lr_at(0, steps, lr, warmup))
    step_fn.warmup_and_capture(warm, next_batch)
    step, losses, history = warm, [], []
    stopped_early = False
    t_loop = time.perf_counter()
    while step < steps:
        if time.perf_counter() - t0 > max_seconds:
            stopped_early = True
            break
        step_fn.set_lr(lr_at(step, steps, lr, warmup))
        next_batch()
        losses.append(step_fn().detach().clone())
        step += 1
        if step % log_every == 0 or step == steps:
            mean = float(torch.stack(losses).mean()) * LOG2E
            losses.clear()
            el = time.perf_counter() - t0
            history.append({"step": step, "train_bits": round(mean, 4), "seconds": round(el, 1)})
            log(f"step {step:6d}/{steps}  loss {mean:.4f} bits  {el:7.1f}s  "
                f"{(time.perf_counter() - t_loop) / max(1, step - warm) * 1000:.1f} ms/step")
    if device != "cpu":
        torch.cuda.synchronize()
    return {"steps_done": step, "steps_planned": steps, "stopped_early": stopped_early,
            "train_seconds": round(time.perf_counter() - t0, 1), "history": history}


def _device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def run_lm(args) -> dict:
    from mamba_rt.checkpoint import save_checkpoint

    dev = args.device
    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=256, d_state=16, d_conv=4,
                      expand=2, pad_vocab_size_multiple=8)
    files = stdlib_files(args.stdlib)
    train_files, held_files = split_corpus(files, args.heldout_percent)
    train_data = torch.frombuffer(bytearray(b"".join(b for _, b in train_files)), dtype=torch.uint8)
    held_data = torch.frombuffer(bytearray(b"".join(b for _, b in held_files)), dtype=torch.uint8)
    sample, sample_names = heldout_sample(held_files, args.sample_bytes)
    log = _logger(args.out)
    log(f"stdlib {sysconfig.get_paths()['stdlib']}: {len(train_files)} train files ({train_data.numel():,} B), "
        f"{len(held_files)} held-out files ({held_data.numel():,} B); sample {len(sample):,} B "
        f"from {len(sample_names)} files; {cfg.n_params():,} parameters")
    train_gpu = train_data.to(dev).long()
    g = torch.Generator(device=dev).manual_seed(args.seed + 1)
    B, L = args.batch, args.seq
    x = torch.zeros(B, L, dtype=torch.int64, device=dev)
    y = torch.zeros(B, L, dtype=torch.int64, device=dev)
    ar = torch.arange(L + 1, device=dev)

    def next_batch():
        off = torch.randint(0, train_gpu.numel() - L - 1, (B, 1), generator=g, device=dev)
        w = train_gpu[off + ar]
        x.copy_(w[:, :-1])
        y.copy_(w[:, 1:])

    def loss_fn(model, x, y):
        logits, _ = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    model = init_model(cfg, dev, args.seed)
    if dev != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 training: the shipped weights are fp32
    res = train(model, loss_fn, next_batch, x, y, args.steps, args.lr, args.warmup, args.wd, 1.0,
                args.max_seconds, dev, args.log_every, log)
    # evaluation: the same model, exact fp32, zero state per chunk
    model.eval()
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed + 2)
    tr_chunks = eval_chunks(train_data.long(), args.eval_len)
    pick = torch.randperm(tr_chunks.shape[0], generator=gen)[: args.eval_chunks]
    held_chunks = eval_chunks(held_data.long(), args.eval_len)
    hpick = torch.randperm(held_chunks.shape[0], generator=gen)[: args.eval_chunks]
    sample_chunks = eval_chunks(torch.frombuffer(bytearray(sample), dtype=torch.uint8).long(), args.eval_len)
    train_bpb = bits_per_byte(model, tr_chunks[pick].to(dev))
    held_bpb = bits_per_byte(model, held_chunks[hpick].to(dev))
    sample_bpb = bits_per_byte(model, sample_chunks.to(dev))
    log(f"eval ({time.perf_counter() - t:.1f}s): train {train_bpb:.4f}  held-out {held_bpb:.4f}  "
        f"sample {sample_bpb:.4f} bits/byte")
    out = Path(args.out)
    save_checkpoint(cfg, canonical_weights(model), out, fmt="mamba_ssm")
    (out / "heldout_sample.txt").write_bytes(sample)
    info = {
        "task": "lm", "config": {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "params": cfg.n_params()},
        "device": _device_name(dev), "torch": torch.__version__, "python": sys.version.split()[0],
        "seed": args.seed, "batch": B, "seq": L, "lr": args.lr, "warmup": args.warmup, "wd": args.wd,
        "heldout_percent": args.heldout_percent, "tokens_seen": res["steps_done"] * B * L,
        "train_files": len(train_files), "train_bytes": int(train_data.numel()),
        "heldout_files": len(held_files), "heldout_bytes": int(held_data.numel()),
        "eval_len": args.eval_len, "eval_chunks": int(pick.numel()),
        "train_bits_per_byte": round(train_bpb, 4), "heldout_bits_per_byte": round(held_bpb, 4),
        "sample_bits_per_byte": round(sample_bpb, 4), "sample_bytes": len(sample), "sample_files": sample_names,
        **res,
    }
    (out / "log.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def run_copying(args) -> dict:
    from mamba_rt.checkpoint import save_checkpoint

    dev = args.device
    cfg = COPY_CONFIG
    log = _logger(args.out)
    g = torch.Generator(device=dev).manual_seed(args.seed + 1)
    B = args.batch
    x = torch.zeros(B, COPY_REGION + COPY_TOKENS, dtype=torch.int64, device=dev)
    y = torch.zeros(B, COPY_TOKENS, dtype=torch.int64, device=dev)

    def next_batch():
        ids, ans = copying_batch(B, g, device=dev)
        x.copy_(ids)
        y.copy_(ans)

    def loss_fn(model, x, y):
        logits, _ = model(x)
        return F.cross_entropy(logits[:, -COPY_TOKENS:].reshape(-1, COPY_VOCAB), y.reshape(-1))

    model = init_model(cfg, dev, args.seed)
    if dev != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False
    res = train(model, loss_fn, next_batch, x, y, args.steps, args.lr, args.warmup, args.wd, 1.0,
                args.max_seconds, dev, args.log_every, log)
    model.eval()
    ids, ans = copying_batch(4096, torch.Generator(device=dev).manual_seed(args.seed + 99), device=dev)
    acc, _ = copying_accuracy(model, ids, ans)
    log(f"selective copying: per-token accuracy {acc:.5f} on 4096 fresh instances (reference ops)")
    out = Path(args.out)
    save_checkpoint(cfg, canonical_weights(model), out, fmt="mamba_ssm")
    info = {"task": "copying", "config": {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "params": cfg.n_params(),
                                          "region": COPY_REGION, "tokens": COPY_TOKENS, "vocab": COPY_VOCAB},
            "device": _device_name(dev), "torch": torch.__version__, "seed": args.seed, "batch": B,
            "lr": args.lr, "warmup": args.warmup, "wd": args.wd, "eval_instances": 4096,
            "eval_accuracy": round(acc, 5), "instances_seen": res["steps_done"] * B, **res}
    (out / "log.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _logger(out):
    Path(out).mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    return log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mamba_rt.demo_train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    for name in ("lm", "copying"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True, help="checkpoint directory to write")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--max-seconds", type=float, default=1e9, help="wall-clock guard: stop early, save")
        s.add_argument("--log-every", type=int, default=100)
        s.add_argument("--wd", type=float, default=0.1)
        if name == "lm":
            s.add_argument("--steps", type=int, default=6000)
            s.add_argument("--batch", type=int, default=64)
            s.add_argument("--seq", type=int, default=256)
            s.add_argument("--lr", type=float, default=2e-3)
            s.add_argument("--warmup", type=int, default=200)
            s.add_argument("--d-model", type=int, default=LM_CONFIG.d_model)
            s.add_argument("--n-layer", type=int, default=LM_CONFIG.n_layer)
            s.add_argument("--stdlib", default=None, help="stdlib folder (default: this Python's)")
            s.add_argument("--heldout-percent", type=int, default=5)
            s.add_argument("--sample-bytes", type=int, default=48_000)
            s.add_argument("--eval-len", type=int, default=512)
            s.add_argument("--eval-chunks", type=int, default=2048)
        else:
            s.add_argument("--steps", type=int, default=8000)
            s.add_argument("--batch", type=int, default=128)
            s.add_argument("--lr", type=float, default=2e-3)
            s.add_argument("--warmup", type=int, default=200)
    args = p.parse_args(argv)
    (run_lm if args.task == "lm" else run_copying)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
