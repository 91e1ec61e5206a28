"""Speed and memory of converted models, as ratios against the original.

One run, side by side, on this machine's CPU (or CUDA with ``--device cuda``):

* eval forward: DINOv2 ViT-S/14 (real weights) batch 32 at 224, and a BERT-base
  shaped encoder at sequence length 128: original, converted (atoms composed on
  every forward), converted with the weight cache, materialized;
* one training step (forward, backward, AdamW) of ViT-S/16: original vs converted;
* conversion of a Llama-8B-shaped attention stack (32 blocks, q/o 4096x4096, k/v
  1024x4096, synthetic bf16 weights): time against one copy of the same weights,
  and peak memory against the weights' size (measured in a child process).

Run: ``python benchmarks/speed.py`` (``--quick`` for smaller shapes); on a GPU,
``python benchmarks/speed.py --device cuda --dtype bfloat16`` (CUDA events). Timings are
the fastest of ``--rounds`` interleaved runs.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import resource
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import masasurgery


def timed(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Fastest seconds per call of each function, over interleaved rounds.

    Variants run in turn, round after round, so load from other processes hits
    them alike; the minimum is the least disturbed run of each. On CUDA each call
    is timed with CUDA events.
    """
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], _seconds(fn))
    return best


def _seconds(fn: Callable[[], None]) -> float:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = (
        torch.cuda.Event(enable_timing=True),
        torch.cuda.Event(enable_timing=True),
    )
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1000.0


def eval_forward(name: str, make, inputs, atoms: int, args) -> list[tuple]:
    """Rows (model, variant, seconds, ratio) for the eval forward of one model."""
    original = make().eval().to(args.dtype)
    inputs = {
        k: v.to(args.dtype) if v.is_floating_point() else v for k, v in inputs.items()
    }
    converted = copy.deepcopy(original)
    masasurgery.convert(converted, atoms=atoms, example_inputs=inputs, verify=False)
    cached = copy.deepcopy(converted)
    masasurgery.set_weight_cache(cached)
    variants = {"original": original, "converted": converted, "converted+cache": cached}
    if hasattr(masasurgery, "materialize"):
        dense = copy.deepcopy(converted)
        masasurgery.materialize(dense)
        variants["materialized"] = dense

    x = {k: v.to(args.device) for k, v in inputs.items()}
    fns = {}
    for variant, model in variants.items():
        model.to(args.device)

        def run(model=model):
            with torch.no_grad():
                model(**x)

        fns[variant] = run
    best = timed(fns, args.rounds)
    return [(name, v, t, t / best["original"]) for v, t in best.items()]


def train_step(make, inputs, atoms: int, args) -> list[tuple]:
    original = make().train()
    converted = copy.deepcopy(original)
    masasurgery.convert(converted, atoms=atoms, example_inputs=inputs, verify=False)
    x = inputs["x"].to(args.device)
    target = torch.randint(0, 10, (x.shape[0],), device=args.device)
    fns = {}
    for variant, model in {"original": original, "converted": converted}.items():
        model.to(args.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x)[:, :10], target).backward()
            optimizer.step()

        fns[variant] = step
    best = timed(fns, args.rounds)
    name = "ViT-S/16 train step, batch 8"
    return [(name, v, t, t / best["original"]) for v, t in best.items()]


class _Attention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, head_dim: int = 128):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            dim // head_dim,
            kv_dim // head_dim,
            head_dim,
        )
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return x + self.o_proj(y.transpose(1, 2).reshape(B, T, C))


def _stack(blocks: int, dim: int, kv_dim: int) -> nn.Module:
    with torch.device("meta"):
        model = nn.Sequential(*[_Attention(dim, kv_dim) for _ in range(blocks)])
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)
    return model


def _convert_in_child(blocks: int, dim: int, kv_dim: int, atoms: int, queue) -> None:
    # Runs in a fresh process so ru_maxrss is this conversion's peak alone
    torch.manual_seed(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = _stack(blocks, dim, kv_dim)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    start = time.perf_counter()
    copies = [p.detach().clone() for p in model.parameters()]
    copy_seconds = time.perf_counter() - start
    del copies
    x = torch.randn(1, 4, dim, dtype=torch.bfloat16)
    start = time.perf_counter()
    masasurgery.convert(
        model, atoms=atoms, example_inputs=x, verify=False, keep_originals=False
    )
    convert_seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    queue.put((weights, copy_seconds, convert_seconds, peak))


def conversion(args) -> list[tuple]:
    blocks, dim, kv_dim = (8, 1024, 256) if args.quick else (32, 4096, 1024)
    atoms = max(1, blocks // 3)
    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=_convert_in_child, args=(blocks, dim, kv_dim, atoms, queue)
    )
    child.start()
    weights, copy_s, convert_s, peak = queue.get()
    child.join()
    name = f"{blocks}x attention {dim}/{kv_dim} bf16 ({weights / 2**30:.2f} GiB)"
    return [
        (name, "copy weights once", copy_s, 1.0),
        (name, f"convert atoms={atoms}", convert_s, convert_s / copy_s),
        (name, "peak memory / weights", peak / 2**30, peak / weights),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs each")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"]
    )
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    from transformers import BertConfig, BertModel

    from masasurgery.zoo import dinov2_vits14, sample_images

    batch = 8 if args.quick else 32
    images = sample_images(("astronaut", "chelsea", "coffee", "rocket"), size=224)
    images = images.repeat(batch // 4, 1, 1, 1)
    bert_config = BertConfig() if not args.quick else BertConfig(num_hidden_layers=4)
    ids = torch.randint(0, bert_config.vocab_size, (8, 128))

    rows = []
    rows += eval_forward(
        f"DINOv2 ViT-S/14 eval, batch {batch}", dinov2_vits14, {"x": images}, 4, args
    )
    rows += eval_forward(
        "BERT-base eval, batch 8 x 128",
        lambda: BertModel(bert_config),
        {"input_ids": ids},
        bert_config.num_hidden_layers // 3,
        args,
    )
    import timm

    rows += train_step(
        lambda: timm.create_model("vit_small_patch16_224", pretrained=False),
        {"x": torch.randn(8, 3, 224, 224)},
        4,
        args,
    )
    rows += conversion(args)

    print(
        f"\nmasasurgery {masasurgery.__version__}, torch {torch.__version__}, "
        f"device {args.device}, {args.dtype}, threads {torch.get_num_threads()}\n"
    )
    print(f"{'what':52s} {'variant':24s} {'value':>10s} {'ratio':>7s}")
    for what, variant, value, ratio in rows:
        unit = "GiB" if "memory" in variant else "s"
        print(f"{what:52s} {variant:24s} {value:9.3f}{unit[0]} {ratio:6.3f}x")


if __name__ == "__main__":
    main()
