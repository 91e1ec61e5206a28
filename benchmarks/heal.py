"""Heal after conversion: what a few CPU minutes of distillation give back.

Real weights, real data, one run:

* DINOv2 ViT-S/14 (``masasurgery.zoo.dinov2_vits14``, transformers backend, so
  the distilled output is ``last_hidden_state``, every token). Healed on random
  crops and flips of 11 scikit-image photos; evaluated on 8 other photos and
  their mirror images. The feature is the normalised cls token.
* all-MiniLM-L6-v2 (``masasurgery.zoo.minilm``). Healed on sentences of the Lee
  corpus's calibration articles, evaluated on 64 sentences of its held-out
  articles (no article in both). The feature is the sentence embedding (masked
  mean of the token states, L2-normalised).

Each model is converted with plain Matrix PCA at atoms = L/3 (DINOv2: 12 blocks,
4 atoms; MiniLM: 6 blocks, 2 atoms) and healed with ``masasurgery.heal.heal``
against its conversion record (no second copy of the model), training the
dictionaries and the replaced projections only. The table gives the held-out
feature cosine and relative error before healing and after 1, 2 and 4 minutes of
training time (teacher and student passes and optimizer steps; evaluations are
not counted), next to the original (cosine 1, error 0 by definition).

Run: ``python benchmarks/heal.py`` (``--minutes 4 --threads 2``; ``--quick`` for a
smoke run of a few seconds per model).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import masasurgery
from masasurgery.heal import heal
from masasurgery.heal_report import EvalPoint, HealReport

# Photos to heal on, and others to evaluate on (skimage's "cat" is "chelsea")
TRAIN_PHOTOS = (
    "astronaut", "brick", "camera", "coffee", "coins", "grass", "gravel", "horse",
    "hubble_deep_field", "moon", "rocket",
)  # fmt: skip
EVAL_PHOTOS = (
    "chelsea", "clock", "cell", "colorwheel", "immunohistochemistry",
    "microaneurysms", "page", "retina",
)  # fmt: skip


@dataclass
class Case:
    """One model, its data, and how to read its feature."""

    name: str
    model: nn.Module
    atoms: int
    blocks: int
    example: object
    train: object
    evals: list
    feature: Callable[[nn.Module, object], Tensor]
    lr: float
    notes: str = ""


@dataclass
class Result:
    """The figures of one case."""

    case: Case
    report: HealReport
    convert_seconds: float
    features: dict[int, tuple[float, float]] = field(default_factory=dict)


def dinov2_case(size: int, batch: int, seed: int) -> Case:
    from masasurgery.zoo import dinov2_vits14, sample_images

    model = dinov2_vits14("transformers", img_size=size)
    photos = sample_images(TRAIN_PHOTOS, size=size * 10 // 7)  # room to crop
    held_out = sample_images(EVAL_PHOTOS, size=size)
    return Case(
        name=f"DINOv2 ViT-S/14 at {size}px",
        model=model,
        atoms=4,
        blocks=12,
        example=held_out[:2],
        train=_Crops(photos, size, batch, seed),
        evals=[held_out, held_out.flip(-1)],
        feature=lambda m, x: F.normalize(m(pixel_values=x).pooler_output, dim=-1),
        lr=1e-5,
        notes=f"batch {batch} random crops",
    )


class _Crops:
    """Endless batches of random square crops (50-100% of the side), resized,
    half of them mirrored."""

    def __init__(self, photos: Tensor, size: int, batch: int, seed: int) -> None:
        self.photos, self.size, self.batch = photos, size, batch
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield torch.cat([self._crop() for _ in range(self.batch)])

    def _crop(self) -> Tensor:
        g, full = self.generator, self.photos.shape[-1]
        index = int(torch.randint(len(self.photos), (1,), generator=g))
        side = int(torch.randint(full // 2, full + 1, (1,), generator=g))
        top, left = torch.randint(full - side + 1, (2,), generator=g).tolist()
        crop = self.photos[index : index + 1, :, top : top + side, left : left + side]
        crop = F.interpolate(
            crop, size=(self.size, self.size), mode="bilinear", antialias=True
        )
        return crop.flip(-1) if torch.rand(1, generator=g) < 0.5 else crop


def minilm_case(batch: int, seed: int) -> Case:
    from masasurgery.zoo import embed_sentences, minilm, minilm_tokenizer
    from masasurgery.zoo.lee import lee_sentences, lee_split

    model, tokenizer = minilm(), minilm_tokenizer()
    split = lee_split()
    train, held_out = lee_sentences(split.calibration), lee_sentences(split.held_out)

    def encode(sentences: list[str]) -> dict[str, Tensor]:
        return dict(
            tokenizer(
                sentences, padding=True, truncation=True, max_length=64,
                return_tensors="pt",
            )
        )  # fmt: skip

    evals = [encode(held_out[i : i + 16]) for i in range(0, 64, 16)]
    return Case(
        name="all-MiniLM-L6-v2",
        model=model,
        atoms=2,
        blocks=6,
        example=evals[0],
        train=_Sentences(train, encode, batch, seed),
        evals=evals,
        feature=lambda m, b: embed_sentences(m, b),
        lr=1e-4,
        notes=f"batch {batch} sentences",
    )


class _Sentences:
    """Endless batches of random calibration sentences, tokenized."""

    def __init__(self, sentences, encode, batch: int, seed: int) -> None:
        self.sentences, self.encode, self.batch = sentences, encode, batch
        self.rng = random.Random(seed)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        while True:
            yield self.encode(self.rng.sample(self.sentences, self.batch))


def run_case(case: Case, minutes: float, eval_every: int) -> Result:
    # The original's features, before the model changes
    with torch.no_grad():
        reference = [case.feature(case.model, x) for x in case.evals]

    # Convert at L/3 (plain Matrix PCA); heal against the record
    start = time.perf_counter()
    conversion = masasurgery.convert(
        case.model, atoms=case.atoms, example_inputs=case.example, verify=False
    )
    convert_seconds = time.perf_counter() - start
    features: dict[int, tuple[float, float]] = {}

    def on_eval(point: EvalPoint) -> None:
        features[point.step] = _feature_figures(case, reference)

    report = heal(
        case.model, conversion, case.train, steps=10**6, lr=case.lr,
        eval_data=case.evals, eval_every=eval_every, max_seconds=minutes * 60,
        on_eval=on_eval, progress=False,
    )  # fmt: skip
    return Result(case, report, convert_seconds, features)


def _feature_figures(case: Case, reference: list[Tensor]) -> tuple[float, float]:
    """Mean cosine and relative error of the features against the original's."""
    features = torch.cat([case.feature(case.model, x) for x in case.evals])
    expected = torch.cat(reference)
    cosine = F.cosine_similarity(features, expected, dim=-1).mean().item()
    error = ((features - expected).norm() / expected.norm()).item()
    return cosine, error


def at_minute(report: HealReport, minute: float) -> EvalPoint:
    """The first evaluation after ``minute`` minutes of training time (or the
    last one, when the heal ended sooner)."""
    after = [e for e in report.evals if e.seconds >= minute * 60]
    return after[0] if after else report.evals[-1]


def table(results: list[Result], minutes: list[float]) -> str:
    heads = [f"{m:g} min" for m in minutes]
    lines = [
        "| model | figure | original | converted | " + " | ".join(heads) + " |",
        "|---|---|---|---|" + "---|" * len(heads),
    ]
    for r in results:
        points = [at_minute(r.report, m) for m in minutes]
        before = r.report.evals[0]
        rows = {
            "feature cosine": [r.features[e.step][0] for e in [before, *points]],
            "feature rel. error": [r.features[e.step][1] for e in [before, *points]],
            "output cosine": [e.cosine for e in [before, *points]],
            "output rel. error": [e.relative_error for e in [before, *points]],
        }
        name = f"{r.case.name}, atoms {r.case.atoms}/{r.case.blocks}"
        for figure, values in rows.items():
            original = "1" if "cosine" in figure else "0"
            cells = " | ".join(f"{v:.4f}" for v in values)
            lines.append(f"| {name} | {figure} | {original} | {cells} |")
    return "\n".join(lines)


def details(results: list[Result]) -> str:
    lines = [
        "| model | data | lr | trained params | convert | steps | s/step | kept step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        report = r.report
        per_step = report.evals[-1].seconds / max(report.steps, 1)
        lines.append(
            f"| {r.case.name} | {r.case.notes} | {r.case.lr:g} | "
            f"{report.trained_parameters:,} | {r.convert_seconds:.1f} s | "
            f"{report.steps} | {per_step:.2f} | {report.best_step} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=98, help="DINOv2 image side")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a few seconds each")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    minutes = [m for m in (1.0, 2.0, 4.0) if m <= args.minutes] or [args.minutes]
    if args.quick:
        args.minutes, minutes, args.eval_every = 0.1, [0.05, 0.1], 2
    started = time.perf_counter()
    results = []
    for build in (lambda: dinov2_case(args.size, 4, 0), lambda: minilm_case(16, 0)):
        case = build()
        print(f"healing {case.name} for {args.minutes:g} min ...", flush=True)
        results.append(run_case(case, args.minutes, args.eval_every))
        print(results[-1].report, flush=True)

    print()
    print(table(results, minutes))
    print()
    print(details(results))
    print(
        f"\ntorch {torch.__version__}, {args.threads} threads, "
        f"total {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
