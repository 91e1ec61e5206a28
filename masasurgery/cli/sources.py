"""How the command line turns a MODEL argument into a model, and records it.

MODEL is one of:

* ``zoo:dinov2_vits14`` or ``zoo:minilm``: real pretrained weights shipped in
  installed packages (:mod:`masasurgery.zoo`);
* a timm name, bare or as ``timm:NAME`` (``vit_small_patch16_224``): random
  weights, unless ``--pretrained`` (weights already in the local hub cache) or
  ``--weights FILE``;
* ``torchvision:NAME`` (``torchvision:vit_b_16``): the same, from
  ``torchvision.models``;
* a transformers model folder, holding ``config.json`` (``hf:DIR`` says so
  explicitly): built with the class its config names, with the folder's weights;
* a masasurgery checkpoint folder (``masasurgery.json``): its ``source.json``
  rebuilds the original model, and the checkpoint is loaded onto it.

A :class:`ModelSource` is the recipe: it builds the same model again (the same
seed for random weights) and round-trips through ``source.json``.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masasurgery.errors import CheckpointError, ConfigError
from masasurgery.io import PLAN_FILE

__all__ = [
    "DTYPES",
    "SOURCE_FILE",
    "ZOO_MODELS",
    "ModelSource",
    "Resolved",
    "holds_weights",
    "read_source",
    "resolve",
    "write_source",
]

logger = logging.getLogger(__name__)

#: The file next to a checkpoint that says how to build its original model.
SOURCE_FILE = "source.json"
_FORMAT = "masasurgery-source"
_PREFIXES = {"timm": "timm", "torchvision": "torchvision", "zoo": "zoo"}
_PREFIXES |= {"hf": "transformers", "transformers": "transformers"}

#: The dtypes ``--dtype`` accepts.
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: The real pretrained models of :mod:`masasurgery.zoo`, as ``zoo:NAME``.
ZOO_MODELS = ("dinov2_vits14", "minilm")


@dataclass(frozen=True)
class ModelSource:
    """How to build a model: where it comes from and with which options.

    Attributes:
        kind: ``"timm"``, ``"torchvision"``, ``"transformers"`` or ``"zoo"``.
        name: The registered name, or the folder of a transformers model.
        kwargs: Keyword arguments of the builder (``depth=3`` for timm, config
            overrides for transformers).
        pretrained: Load the library's pretrained weights (timm, torchvision).
        weights: A local state-dict file (safetensors or a torch pickle of
            tensors) loaded after building, strictly.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        seed: The seed random weights are drawn with.
    """

    kind: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    pretrained: bool = False
    weights: str | None = None
    dtype: str = "float32"
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"

    def build(self) -> nn.Module:
        """The model, on the CPU, in eval mode, in :attr:`dtype`.

        Raises:
            ConfigError: The name is unknown, the options do not fit the model,
                or pretrained weights cannot be found.

        Example:
            >>> source = ModelSource("timm", "vit_tiny_patch16_224", {"depth": 2})
            >>> type(source.build()).__name__
            'VisionTransformer'
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = _BUILDERS[self.kind](self)
        if self.weights is not None:
            _load_weights(model, Path(self.weights))
        return model.to(DTYPES[self.dtype]).eval()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        """The inverse of :meth:`to_dict`; unknown kinds and dtypes are an error."""
        source = cls(**data)
        if source.kind not in _BUILDERS or source.dtype not in DTYPES:
            raise ConfigError(
                f"a model source needs kind in {sorted(_BUILDERS)} and dtype in "
                f"{sorted(DTYPES)}, got {source.kind!r} and {source.dtype!r}."
            )
        return source


@dataclass(frozen=True)
class Resolved:
    """A MODEL argument, resolved.

    Attributes:
        source: How to build the (original) model.
        checkpoint: A checkpoint folder to load onto it, or None.
        inputs: The input options recorded with the checkpoint (empty otherwise).
    """

    source: ModelSource
    checkpoint: Path | None = None
    inputs: dict[str, Any] = field(default_factory=dict)


def resolve(
    spec: str,
    *,
    kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    dtype: str | None = None,
    seed: int | None = None,
) -> Resolved:
    """Tell what a MODEL argument names, without building anything.

    Raises:
        ConfigError: Nothing of that name or path exists, or options are given
            that a checkpoint's ``source.json`` already fixes.
        CheckpointError: A checkpoint folder has no readable ``source.json``.

    Example:
        >>> resolve("vit_tiny_patch16_224").source.label
        'timm:vit_tiny_patch16_224'
        >>> resolve("zoo:minilm").source.kind
        'zoo'
    """
    options = dict(
        kwargs=dict(kwargs or {}),
        pretrained=pretrained,
        weights=None if weights is None else str(Path(weights).expanduser().resolve()),
        dtype=dtype or "float32",
        seed=0 if seed is None else seed,
    )
    prefix, colon, rest = spec.partition(":")
    if colon and prefix in _PREFIXES:
        kind = _PREFIXES[prefix]
        name = (
            str(Path(rest).expanduser().resolve()) if kind == "transformers" else rest
        )
        return Resolved(_checked(ModelSource(kind, name, **options)))

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / PLAN_FILE).is_file():
            given = kwargs or pretrained or weights or dtype or seed is not None
            return _checkpoint(path, given=bool(given))
        return Resolved(
            _checked(ModelSource("transformers", str(path.resolve()), **options))
        )
    if path.exists() or "/" in spec or spec.startswith((".", "~")):
        raise ConfigError(
            f"MODEL {spec!r} is not a folder; expected a transformers model folder "
            "(with config.json) or a masasurgery checkpoint folder (with "
            f"{PLAN_FILE}). Check the path."
        )
    return Resolved(_checked(ModelSource("timm", spec, **options)))


def holds_weights(folder: Path) -> bool:
    """True when a transformers model folder has a weights file to load."""
    folder = Path(folder)
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def write_source(directory: Path, source: ModelSource, inputs: dict[str, Any]) -> Path:
    """Write ``source.json`` into a checkpoint folder; returns its path."""
    from masasurgery import __version__

    data = {
        "format": _FORMAT,
        "format_version": 1,
        "masasurgery_version": __version__,
        "source": source.to_dict(),
        "inputs": inputs,
    }
    path = Path(directory) / SOURCE_FILE
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_source(directory: Path) -> tuple[ModelSource, dict[str, Any]]:
    """Read a checkpoint's ``source.json``: the model source and input options.

    Raises:
        CheckpointError: The file is missing or malformed.
    """
    path = Path(directory) / SOURCE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is a masasurgery checkpoint without {SOURCE_FILE}, so the "
            "command line cannot rebuild its original model (`masasurgery convert "
            "--out` writes one). In Python, build the original model and call "
            "masasurgery.load(model, folder)."
        )
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {_FORMAT!r}")
        return ModelSource.from_dict(data["source"]), dict(data.get("inputs") or {})
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"{path} is not a readable model source ({type(e).__name__}: {e}); it "
            "should be the file `masasurgery convert --out` wrote."
        ) from e


def _checkpoint(path: Path, *, given: bool) -> Resolved:
    source, inputs = read_source(path)
    if given:
        raise ConfigError(
            f"{path} is a checkpoint: its {SOURCE_FILE} fixes how the model is "
            f"built ({source.label}, dtype {source.dtype}, seed {source.seed}); drop "
            "--model-kwargs, --pretrained, --weights, --dtype and --seed."
        )
    return Resolved(source, checkpoint=path.resolve(), inputs=inputs)


def _checked(source: ModelSource) -> ModelSource:
    """Fail early on a name or folder that cannot exist."""
    if source.kind == "zoo" and source.name not in ZOO_MODELS:
        raise ConfigError(
            f"unknown zoo model {source.name!r}; expected one of "
            f"{', '.join('zoo:' + n for n in ZOO_MODELS)}."
        )
    if (
        source.kind == "transformers"
        and not (Path(source.name) / "config.json").is_file()
    ):
        raise ConfigError(
            f"{source.name} has no config.json; expected a transformers model folder "
            "(written by save_pretrained) or a masasurgery checkpoint folder."
        )
    if source.kind == "timm":
        _check_timm_name(source.name)
    if source.dtype not in DTYPES:
        raise ConfigError(
            f"dtype must be one of {sorted(DTYPES)}, got {source.dtype!r}."
        )
    return source


def _check_timm_name(name: str) -> None:
    timm = _require("timm", "timm")
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"MODEL {name!r} is neither a folder nor a timm model name.{hint} MODEL may "
        "be a timm name (vit_small_patch16_224), torchvision:NAME, zoo:NAME "
        f"({', '.join(ZOO_MODELS)}), a transformers model folder, or a checkpoint "
        "folder."
    )


# ---------------------------------------------------------------------------
# Builders, one per kind


def _build_timm(source: ModelSource) -> nn.Module:
    timm = _require("timm", "timm")
    return _call(source, timm.create_model, source.name, source.pretrained)


def _build_torchvision(source: ModelSource) -> nn.Module:
    models = _require("torchvision", "torchvision").models
    if source.name not in models.list_models():
        close = difflib.get_close_matches(source.name, models.list_models(), n=3)
        raise ConfigError(
            f"unknown torchvision model {source.name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else ".")
        )
    weights = "DEFAULT" if source.pretrained else None
    return _call(source, models.get_model, source.name, weights=weights)


def _build_transformers(source: ModelSource) -> nn.Module:
    transformers = _require("transformers", "transformers")
    path = Path(source.name)
    config = _call(source, transformers.AutoConfig.from_pretrained, path)
    names = [n for n in config.architectures or [] if hasattr(transformers, n)]
    cls = getattr(transformers, names[0]) if names else transformers.AutoModel
    if holds_weights(path):
        return _call(source, cls.from_pretrained, path, config=config, kwargs={})
    if source.pretrained:
        raise ConfigError(f"--pretrained was given, but {path} holds no weights file.")
    logger.warning(
        "%s holds no weights file: random weights (seed %d)", path, source.seed
    )
    build = cls if names else transformers.AutoModel.from_config
    return _call(source, build, config, kwargs={})


def _build_zoo(source: ModelSource) -> nn.Module:
    import masasurgery.zoo

    return _call(source, getattr(masasurgery.zoo, source.name))


_BUILDERS = {
    "timm": _build_timm,
    "torchvision": _build_torchvision,
    "transformers": _build_transformers,
    "zoo": _build_zoo,
}


def _call(source: ModelSource, build: Any, *args: Any, **options: Any) -> Any:
    """Call a builder with the source's kwargs; its failures become ConfigError."""
    kwargs = options.pop("kwargs", source.kwargs)
    try:
        return build(*args, **options, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"could not build {source.label} with options {source.kwargs}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    except OSError as e:
        if not source.pretrained and source.kind != "transformers":
            raise
        raise ConfigError(
            f"could not load the weights of {source.label}: {str(e).splitlines()[0]} "
            "No hub is reachable and the weights are not in the local cache: fetch "
            "them where there is a network, pass a local file with --weights FILE, "
            f"or use a zoo model with real weights ({', '.join(ZOO_MODELS)})."
        ) from e


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file.")
    if path.suffix == ".safetensors":
        import safetensors.torch

        state = safetensors.torch.load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(
            f"--weights {path} does not fit {type(model).__name__}: "
            f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}"
            " Build the model with the options the weights were trained with."
        ) from e


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"this MODEL needs the package {package!r}: pip install {package}"
        ) from e
