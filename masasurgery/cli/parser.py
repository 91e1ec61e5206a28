"""The command line's arguments: ``masasurgery {analyze,convert,verify} MODEL``."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from masasurgery.cli.examples import IMAGES
from masasurgery.cli.output import EXIT_CODES_HELP
from masasurgery.cli.sources import DTYPES, ZOO_MODELS

__all__ = ["build_parser", "parse_input_size", "parse_kwargs"]

_MODEL_HELP = (
    "a timm name (vit_small_patch16_224, or timm:NAME), torchvision:NAME, "
    f"zoo:NAME ({', '.join(ZOO_MODELS)}), a transformers model folder (with "
    "config.json), or a masasurgery checkpoint folder written by convert --out"
)

_EXAMPLES = """examples:
  masasurgery analyze vit_small_patch16_224 --plot spectrum.png
  masasurgery convert zoo:dinov2_vits14 --atoms 4 --out dinov2-masa --plot dino.png
  masasurgery convert ./my-bert --ratio 0.6 --roles q,k --json > report.json
  masasurgery verify dinov2-masa
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``masasurgery``, with its three commands."""
    from masasurgery import __version__

    parser = argparse.ArgumentParser(
        prog="masasurgery",
        description="Share the attention projections of a transformer as MASA "
        "atom dictionaries: analyze a model, convert it, verify the result.",
        epilog=f"{_EXAMPLES}\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_model_options(), _input_options(), _run_options()]

    analyze = _command(
        commands,
        "analyze",
        common,
        "find and group the attention "
        "blocks; with --spectrum or --plot, how much energy each "
        "role keeps as atoms grow (how to pick atoms)",
    )
    analyze.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    analyze.add_argument(
        "--atoms", type=_positive, metavar="K", help="mark K atoms on the spectrum"
    )
    analyze.add_argument(
        "--spectrum",
        action="store_true",
        help="print the atoms that keep 90/95/99%% of the energy",
    )
    analyze.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the spectrum to this file (needs matplotlib)",
    )

    convert = _command(
        commands,
        "convert",
        [*common, _verify_options()],
        "convert a model, verify it, save the checkpoint",
    )
    convert.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    size = convert.add_mutually_exclusive_group(required=True)
    size.add_argument(
        "--atoms",
        type=_positive,
        metavar="K",
        help="atoms per dictionary (as many as a group's blocks: lossless)",
    )
    size.add_argument(
        "--ratio",
        type=float,
        metavar="R",
        help="share of the shared weights to remove, e.g. 0.66; "
        "picks the largest atoms count that removes at least that",
    )
    convert.add_argument(
        "--out",
        metavar="DIR",
        help="save the checkpoint (weights, plan, source.json) here",
    )
    convert.add_argument(
        "--calibration",
        metavar="PATH",
        help="data to fit to (masasurgery.compress): a .safetensors/.pt file of "
        "inputs, or a folder of saved statistics; with --ratio, a budget solver "
        "picks atoms and residual ranks per dictionary",
    )
    convert.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the spectrum and the per-layer error here",
    )
    convert.add_argument(
        "--no-verify",
        action="store_true",
        help="skip verification (exit 0 whatever it would say)",
    )

    verify = _command(
        commands,
        "verify",
        [*common, _verify_options()],
        "verify a checkpoint against its rebuilt original, or a "
        "model converted now (losslessly unless --atoms)",
    )
    verify.add_argument(
        "model",
        metavar="DIR_OR_MODEL",
        help="a checkpoint folder written by convert --out, or MODEL as for convert",
    )
    verify.add_argument(
        "--atoms",
        type=_positive,
        metavar="K",
        help="for a MODEL: atoms per dictionary (default: lossless)",
    )
    return parser


def parse_kwargs(text: str) -> dict[str, Any]:
    """``depth=3,img_size=32`` or a JSON object, to keyword arguments.

    Values are read as JSON when they parse (``3``, ``0.5``, ``true``,
    ``[32,32]``, ``null``), else kept as strings (``global_pool=avg``).

    Example:
        >>> parse_kwargs("depth=3,img_size=[32,32],global_pool=avg,qkv_bias=false")
        {'depth': 3, 'img_size': [32, 32], 'global_pool': 'avg', 'qkv_bias': False}
        >>> parse_kwargs('{"depth": 3}')
        {'depth': 3}
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON object: {e}") from e
        if not isinstance(data, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
        return data
    kwargs = {}
    for item in re.split(r",\s*(?=[A-Za-z_]\w*\s*=)", text):
        key, equals, value = item.partition("=")
        if not equals or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(
                f"expected key=value pairs like depth=3,img_size=32, got {item!r}"
            )
        kwargs[key.strip()] = _value(value.strip())
    return kwargs


def parse_input_size(text: str) -> tuple[int, ...]:
    """``224``, ``224,160``, ``3,224,224`` or ``224x160``, to a tuple of sizes.

    Example:
        >>> parse_input_size("3,224,224"), parse_input_size("224x160")
        ((3, 224, 224), (224, 160))
    """
    try:
        size = tuple(int(s) for s in re.split(r"[,x]", text.strip()))
    except ValueError:
        size = ()
    if not 1 <= len(size) <= 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(
            f"expected H, H,W or C,H,W (positive integers), got {text!r}"
        )
    return size


class _MergeKwargs(argparse.Action):
    """Repeated --model-kwargs merge into one dict."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        merged = dict(getattr(namespace, self.dest) or {})
        setattr(namespace, self.dest, merged | values)


def _command(commands: Any, name: str, parents: list, help: str) -> Any:
    return commands.add_parser(
        name,
        parents=parents,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _model_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument(
        "--model-kwargs",
        type=parse_kwargs,
        action=_MergeKwargs,
        default={},
        metavar="K=V,...",
        help="builder options: timm/torchvision kwargs (depth=6,"
        "img_size=224), transformers config overrides, or a JSON "
        "object; may repeat",
    )
    group.add_argument(
        "--pretrained",
        action="store_true",
        help="timm/torchvision pretrained weights (from the local "
        "hub cache; fails clearly offline)",
    )
    group.add_argument(
        "--weights",
        metavar="FILE",
        help="a local state-dict file (.safetensors, .pth) to load",
    )
    group.add_argument(
        "--dtype", choices=list(DTYPES), help="cast the model (default float32)"
    )
    group.add_argument(
        "--seed", type=int, help="seed of random weights and inputs (default 0)"
    )
    return parent


def _input_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("example inputs")
    group.add_argument(
        "--batch-size",
        type=_positive,
        metavar="N",
        help="examples per batch (default 2)",
    )
    group.add_argument(
        "--input-size",
        type=parse_input_size,
        metavar="H[,W]",
        help="image size: H, H,W or C,H,W (default: the model's)",
    )
    group.add_argument(
        "--seq-len",
        type=_positive,
        metavar="T",
        help="tokens per example for text models (default 16)",
    )
    group.add_argument(
        "--images",
        choices=IMAGES,
        help="random noise, or real photos from scikit-image "
        "(default random; photos for zoo:dinov2_vits14)",
    )
    return parent


def _run_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("run and output")
    group.add_argument(
        "--roles",
        default="q,k,v,o",
        metavar="q,k,v,o",
        help="roles to share (default all four)",
    )
    group.add_argument(
        "--device",
        metavar="DEVICE",
        help="cpu, cuda, cuda:1 (default: model on the CPU, "
        "verification on CUDA when there is one)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document to stdout instead of tables",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="info logs (-vv: debug) and tracebacks, on stderr",
    )
    group.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar, errors only"
    )
    return parent


def _verify_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("verification")
    group.add_argument(
        "--task",
        default="auto",
        choices=["auto", "classification", "lm", "none"],
        help="prediction figures to add (default: told from the output)",
    )
    group.add_argument(
        "--reference-float64",
        action="store_true",
        help="also compare both models with a float64 CPU run of "
        "the original (the kernels' noise floor)",
    )
    return parent


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _value(text: str) -> Any:
    python = {"True": True, "False": False, "None": None}
    if text in python:
        return python[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
