"""Train a small attention-free MoE language model twice, with an auxiliary balance loss and
aux-loss-free (bias) balancing, and compare loss and MaxVio (arXiv 2408.15664 reports comparable
perplexity and a much lower MaxVio for the loss-free method).

Model: token embedding + token-shift (the previous token's embedding, the only context an attention-free
model gets) -> N x [RMSNorm -> moe-ir eager MoE layer -> residual] -> RMSNorm -> head.
Corpus: generated deterministically: a Markov chain whose next-token distributions are Zipfian over a
per-token random permutation of the vocabulary, so the loss has a known floor (the chain's entropy).
MoE layer: sigmoid scores, top-k renormalised (DeepSeek-V3 routing); run A adds the DeepSeekMoE
expert-level loss (α = --alpha), run B updates the routing bias after every step (γ = --gamma).

Writes to --out: results.md (table), curves.png (loss and MaxVio per step), loads.json (tokens per expert
per layer per step for each run; `python -m moe_ir.maxvio` reads the per-run files).

    python tools/train_demo.py --out out/train_demo [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moe_ir.backends.torch_eager import MoELayer
from moe_ir.maxvio import MaxVioTracker
from moe_ir.params import atomic_write
from moe_ir.spec import spec_from_dict


def make_corpus(vocab: int, chains: int, length: int, seed: int) -> tuple[torch.Tensor, float]:
    """[chains, length] tokens of a Zipfian Markov chain, and the chain's entropy rate in nats."""
    gen = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.2
    zipf /= zipf.sum()
    trans = torch.empty(vocab, vocab, dtype=torch.float64)
    for a in range(vocab):
        trans[a, torch.randperm(vocab, generator=gen)] = zipf
    tokens = torch.empty(chains, length, dtype=torch.int64)
    tokens[:, 0] = torch.randint(vocab, (chains,), generator=gen)
    for i in range(1, length):
        tokens[:, i] = torch.multinomial(trans[tokens[:, i - 1]], 1, generator=gen).squeeze(1)
    # Entropy rate estimated on the stream itself: mean -log p(next | prev) under the true chain.
    prev = tokens[:, :-1].reshape(-1)
    entropy = -(trans[prev, tokens[:, 1:].reshape(-1)].log()).mean().item()
    return tokens, entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class MoELM(nn.Module):
    def __init__(self, vocab: int, layers: int, spec, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        h = spec.hidden
        self.embed = nn.Embedding(vocab, h)
        self.shift = nn.Embedding(vocab, h)
        self.norms = nn.ModuleList(RMSNorm(h) for _ in range(layers))
        self.moes = nn.ModuleList(MoELayer.from_spec(spec, seed=seed * 100 + i) for i in range(layers))
        self.final_norm = RMSNorm(h)
        self.head = nn.Linear(h, vocab, bias=False)

    def forward(self, tokens):
        prev = F.pad(tokens[:, :-1], (1, 0))
        h = self.embed(tokens) + self.shift(prev)
        aux = h.new_zeros(())
        loads = []
        for norm, moe in zip(self.norms, self.moes):
            res = moe(norm(h))
            h = h + res.out
            aux = aux + res.aux_loss
            loads.append(res.routing["tokens_per_expert"])
        return self.head(self.final_norm(h)), aux, loads


def train(name: str, spec, args, corpus: torch.Tensor, aux_free: bool) -> dict:
    from tqdm import tqdm

    model = MoELM(args.vocab, args.layers, spec, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    train_rows = corpus[:-args.batch]
    held_out = corpus[-args.batch:, :args.seq + 1]
    tracker = MaxVioTracker()
    history = {"step": [], "loss": [], "maxvio": []}
    bar = tqdm(range(args.steps), desc=name, unit="step", dynamic_ncols=True)
    for step in bar:
        rows = torch.randint(train_rows.shape[0], (args.batch,), generator=gen)
        starts = torch.randint(corpus.shape[1] - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_rows[r, s:s + args.seq + 1] for r, s in zip(rows.tolist(), starts.tolist())])
        logits, aux, loads = model(batch[:, :-1])
        lm_loss = F.cross_entropy(logits.reshape(-1, args.vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (lm_loss + aux).backward()
        opt.step()
        if aux_free:
            for moe, load in zip(model.moes, loads):
                moe.update_bias(load)
        step_vio = tracker.update({f"layer{i}": load for i, load in enumerate(loads)})
        mean_vio = sum(step_vio.values()) / len(step_vio)
        history["step"].append(step)
        history["loss"].append(lm_loss.item())
        history["maxvio"].append(mean_vio)
        bar.set_postfix(loss=f"{lm_loss.item():.3f}", maxvio=f"{mean_vio:.2f}")
    model.eval()
    with torch.no_grad():
        logits, _, loads = model(held_out[:, :-1])
        eval_loss = F.cross_entropy(logits.reshape(-1, args.vocab), held_out[:, 1:].reshape(-1)).item()
        eval_vio = sum(MaxVioTracker().update({f"l{i}": l for i, l in enumerate(loads)}).values()) / len(loads)
    window = max(1, args.steps // 5)
    summary = tracker.summary(last=window)
    return {
        "history": history,
        "loads": tracker.loads,
        "final_loss": sum(history["loss"][-window:]) / window,
        "eval_loss": eval_loss,
        "maxvio_batch": sum(s["batch_mean"] for s in summary.values()) / len(summary),
        "maxvio_global": sum(s["global"] for s in summary.values()) / len(summary),
        "maxvio_eval": eval_vio,
        "window": window,
    }


def write_plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_vio) = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in results.items():
        h = res["history"]
        ax_loss.plot(h["step"], _smooth(h["loss"]), label=name)
        ax_vio.plot(h["step"], _smooth(h["maxvio"]), label=name)
    ax_loss.set(xlabel="step", ylabel="training loss (nats, smoothed)", title="language-model loss")
    ax_vio.set(xlabel="step", ylabel="MaxVio (mean over layers, smoothed)", title="load imbalance")
    for ax in (ax_loss, ax_vio):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _smooth(values, width: int = 10):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/train_demo"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=0.01, help="expert-level aux loss weight (run A)")
    parser.add_argument("--gamma", type=float, default=1e-3, help="bias update rate (run B)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    corpus, entropy = make_corpus(args.vocab, chains=256, length=1024, seed=args.seed)
    base = {"hidden": args.hidden, "experts": {"routed": args.experts, "width": args.width, "top_k": args.top_k},
            "router": {"score": "sigmoid", "normalize": True}}
    runs = {
        f"aux loss (expert-level, α={args.alpha:g})": (spec_from_dict({**base, "balance": {"expert": args.alpha}}), False),
        f"aux-loss-free (γ={args.gamma:g})": (spec_from_dict({**base, "balance": {"aux_free": {"gamma": args.gamma}}}), True),
    }
    results = {}
    start = time.perf_counter()
    for name, (spec, aux_free) in runs.items():
        results[name] = train(name, spec, args, corpus, aux_free)
    elapsed = time.perf_counter() - start

    window = next(iter(results.values()))["window"]
    lines = [
        f"# MoE LM: aux loss vs aux-loss-free balancing ({args.steps} steps)",
        "",
        f"{args.layers} MoE layers, hidden {args.hidden}, {args.experts} experts of width {args.width}, top-{args.top_k}, "
        f"sigmoid scores (normalised); batch {args.batch}x{args.seq} tokens; vocab {args.vocab}; "
        f"corpus entropy rate (loss floor) {entropy:.3f} nats; wall time {elapsed:.0f}s.",
        f"Training loss and MaxVio are means over the last {window} steps; MaxVio is averaged over layers.",
        "",
        "| run | train loss | held-out loss | MaxVio (per batch) | MaxVio (global) | MaxVio (held-out batch) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['final_loss']:.4f} | {r['eval_loss']:.4f} | {r['maxvio_batch']:.3f} | "
                     f"{r['maxvio_global']:.3f} | {r['maxvio_eval']:.3f} |")
    table = "\n".join(lines) + "\n"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(table))
    for i, (name, r) in enumerate(results.items()):
        atomic_write(out / f"loads_run{i}.json", lambda tmp, r=r: Path(tmp).write_text(json.dumps(r["loads"])))
    atomic_write(out / "history.json", lambda tmp: Path(tmp).write_text(
        json.dumps({name: r["history"] for name, r in results.items()})))
    write_plot(out / "curves.png", results)
    print(table)
    print(f"wrote {out / 'results.md'}, {out / 'curves.png'}, loads_run*.json, history.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
