"""The commands: ``analyze``, ``convert`` and ``verify``.

Each takes the parsed arguments and an :class:`~masasurgery.cli.output.Output`,
and returns an :class:`~masasurgery.cli.output.Outcome`: the report as text and
as JSON data, and the exit code. Errors are raised; ``main`` turns them into
exit codes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from masasurgery.analyze import analyze
from masasurgery.cli.calibration import read_calibration
from masasurgery.cli.loading import Loaded, load_model, parse_roles
from masasurgery.cli.output import ExitCode, Outcome, Output
from masasurgery.cli.ratio import atoms_for_ratio
from masasurgery.cli.reload import reload_conversion
from masasurgery.cli.sources import holds_weights, write_source
from masasurgery.convert import Conversion, convert
from masasurgery.errors import AlreadyConvertedError, ConfigError
from masasurgery.io import read_checkpoint, save
from masasurgery.report import format_table
from masasurgery.verify import VerificationReport, verify

__all__ = ["COMMANDS", "analyze_command", "convert_command", "verify_command"]

# Energy shares the analyze table gives the atoms count for
_SHARES = (0.9, 0.95, 0.99)


def analyze_command(args: argparse.Namespace, out: Output) -> Outcome:
    """Find and group the attention blocks; with --spectrum or --plot, the energy
    each role's dictionary keeps as atoms grow."""
    roles = parse_roles(args.roles)
    spectrum = args.spectrum or args.plot is not None
    with out.steps(["build model", "analyze", *["spectrum"] * spectrum]) as steps:
        steps.start("build model")
        loaded = load_model(args)
        _refuse_checkpoint(loaded, "analyze")
        steps.start("analyze")
        analysis = analyze(loaded.model, loaded.inputs)
        curves = None
        if spectrum:
            steps.start("spectrum")
            from masasurgery.plot import energy_curves

            curves = energy_curves(
                loaded.model, loaded.inputs, roles=roles, atoms=args.atoms
            )

    # The report: the analysis, the spectrum table, the plot
    lines = [_header(loaded), str(analysis)]
    plot_path = None
    if curves is not None:
        lines += ["", _spectrum_table(curves, args.atoms)]
    if args.plot is not None:
        from masasurgery.plot import plot_spectrum

        plot_path = plot_spectrum(curves, args.plot).path
        lines.append(f"\nspectrum plot: {plot_path}")
    data = {
        "command": "analyze",
        **loaded.describe(),
        "analysis": analysis.to_dict(),
        "spectrum": None if curves is None else [asdict(c) for c in curves],
        "plot": None if plot_path is None else str(plot_path),
    }
    return Outcome("\n".join(lines), data)


def convert_command(args: argparse.Namespace, out: Output) -> Outcome:
    """Convert (fitted to calibration data with --calibration), verify, and save
    the checkpoint and the plots asked for."""
    roles = parse_roles(args.roles)
    _check_out(args.out)
    uniform_ratio = args.ratio is not None and args.calibration is None
    names = ["build model", "analyze"] * uniform_ratio + ["convert"]
    names += ["verify"] * (not args.no_verify) + ["save"] * (args.out is not None)
    with out.steps(names + ["plot"] * (args.plot is not None)) as steps:
        # The model, and the atoms for a ratio without calibration data
        steps.start("build model")
        loaded = load_model(args)
        _refuse_checkpoint(loaded, "convert")
        atoms, choice = args.atoms, None
        if uniform_ratio:
            steps.start("analyze")
            analysis = analyze(loaded.model, loaded.inputs)
            choice = atoms_for_ratio(analysis, args.ratio, roles)
            atoms = choice.atoms

        # Convert, then verify in a step of its own
        steps.start("convert")
        conversion = _convert(args, loaded, atoms, roles)
        if not args.no_verify:
            steps.start("verify")
            conversion.verification = _verify(args, loaded, conversion)
        passed = conversion.verification is None or conversion.verification.passed

        # Save only what passed; plot in any case, to help see what failed
        saved = None
        if args.out is not None and passed:
            steps.start("save")
            saved = _save(args, loaded, conversion)
        plot_path = None
        if args.plot is not None:
            steps.start("plot")
            from masasurgery.plot import plot_conversion

            plot_path = plot_conversion(conversion, args.plot).path

    return _convert_outcome(loaded, conversion, choice, saved, plot_path, passed)


def verify_command(args: argparse.Namespace, out: Output) -> Outcome:
    """Verify a checkpoint against its rebuilt original, or a model converted
    now (losslessly unless --atoms)."""
    roles = parse_roles(args.roles)
    with out.steps(["build model", "convert", "verify"]) as steps:
        steps.start("build model")
        loaded = load_model(args)
        _check_atoms_for(loaded, args.atoms)
        steps.start("convert")
        checkpoint = None
        if loaded.checkpoint is not None:
            reloaded = reload_conversion(loaded.model, loaded.checkpoint, loaded.inputs)
            checkpoint, conversion = reloaded.checkpoint, reloaded.conversion
        else:
            atoms = args.atoms or _lossless_atoms(loaded)
            conversion = convert(
                loaded.model,
                atoms,
                example_inputs=loaded.inputs,
                roles=roles,
                verify=False,
            )
        steps.start("verify")
        report = _verify(args, loaded, conversion)

    header = _header(loaded)
    if checkpoint is not None:
        header += f"\n{checkpoint}"
    else:
        header += f"\nconverted now: {conversion.config.to_json()}"
    data = {
        "command": "verify",
        **loaded.describe(),
        "config": conversion.config.to_dict(),
        "verification": report.to_dict(),
        "passed": report.passed,
    }
    code = ExitCode.OK if report.passed else ExitCode.VERIFICATION_FAILED
    reason = None if report.passed else _failed(report)
    return Outcome(f"{header}\n\n{report}", data, code, reason)


#: The commands by name.
COMMANDS = {
    "analyze": analyze_command,
    "convert": convert_command,
    "verify": verify_command,
}


def _convert(
    args: argparse.Namespace, loaded: Loaded, atoms: int | None, roles: tuple
) -> Conversion:
    """Matrix PCA of the weights, or a calibrated fit with --calibration."""
    if args.calibration is None:
        return convert(
            loaded.model, atoms, example_inputs=loaded.inputs, roles=roles, verify=False
        )
    from masasurgery.compress import compress

    data = read_calibration(args.calibration, loaded.model, loaded.spec.batch_size)
    return compress(
        loaded.model,
        data,
        ratio=args.ratio,
        atoms=args.atoms,
        roles=roles,
        example_inputs=loaded.inputs,
        verify=False,
    )


def _verify(
    args: argparse.Namespace, loaded: Loaded, conversion: Conversion
) -> VerificationReport:
    return verify(
        loaded.model,
        conversion,
        loaded.inputs,
        device=loaded.device,
        task=args.task,
        reference_float64=args.reference_float64,
    )


def _save(args: argparse.Namespace, loaded: Loaded, conversion: Conversion) -> Any:
    checkpoint = save(loaded.model, args.out, conversion=conversion)
    write_source(checkpoint.directory, loaded.resolved.source, loaded.spec.to_dict())
    return checkpoint


def _convert_outcome(
    loaded: Loaded,
    conversion: Conversion,
    choice: Any,
    saved: Any,
    plot_path: Any,
    passed: bool,
) -> Outcome:
    lines = [_header(loaded)]
    lines += [] if choice is None else [str(choice)]
    lines += ["", str(conversion)]
    if saved is not None:
        files = sorted(p.name for p in saved.directory.iterdir())
        lines.append(f"\nsaved to {saved.directory}: {', '.join(files)}")
    if plot_path is not None:
        lines.append(f"plot: {plot_path}")
    data = {
        "command": "convert",
        **loaded.describe(),
        "atoms_choice": None if choice is None else asdict(choice),
        "conversion": conversion.to_dict(),
        "saved": None if saved is None else str(saved.directory),
        "plot": None if plot_path is None else str(plot_path),
        "passed": passed,
    }
    if passed:
        return Outcome("\n".join(lines), data)
    reason = _failed(conversion.verification) + "; nothing was saved"
    return Outcome("\n".join(lines), data, ExitCode.VERIFICATION_FAILED, reason)


def _refuse_checkpoint(loaded: Loaded, command: str) -> None:
    if loaded.checkpoint is None:
        return
    checkpoint = read_checkpoint(loaded.checkpoint)
    raise AlreadyConvertedError(
        f"{loaded.checkpoint} is a checkpoint, already converted "
        f"({checkpoint.config.to_json() if checkpoint.config else 'no options'}); "
        f"{command} its original instead: {_original(loaded)}."
    )


def _original(loaded: Loaded) -> str:
    # The MODEL argument (and its options) that builds the checkpoint's original
    source = loaded.resolved.source
    options = ",".join(f"{k}={_option(v)}" for k, v in source.kwargs.items())
    return source.label + (f" --model-kwargs {options}" if options else "")


def _option(value: Any) -> str:
    # As --model-kwargs reads it back: strings bare, the rest as compact JSON
    return value if isinstance(value, str) else json.dumps(value, separators=",:")


def _check_out(out: str | None) -> None:
    # Before the conversion runs, not after it
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(
            f"--out {out} is a file; a checkpoint is a folder (weights, plan and "
            "source.json). Pass a new or existing folder, e.g. --out "
            f"{Path(out).with_suffix('')}-masa, and --json > FILE for the report."
        )


def _check_atoms_for(loaded: Loaded, atoms: int | None) -> None:
    if loaded.checkpoint is None or atoms is None:
        return
    raise ConfigError(
        f"--atoms {atoms} applies to a MODEL converted now, but "
        f"{loaded.checkpoint} is a checkpoint, whose atoms were fixed when it "
        "was saved; drop --atoms to verify it as saved, or pass its original "
        f"({_original(loaded)}) to convert it with other atoms."
    )


def _lossless_atoms(loaded: Loaded) -> int:
    # As many atoms as the largest group has blocks: lossless everywhere
    groups = analyze(loaded.model, loaded.inputs).groups
    return max((g.num_blocks for g in groups), default=1)


def _failed(report: VerificationReport) -> str:
    failures = report.failures
    first = failures[0] if failures else "see the report"
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return f"verification failed: {first}{more}"


def _header(loaded: Loaded) -> str:
    source, spec = loaded.resolved.source, loaded.spec
    options = "".join(f", {k}={v}" for k, v in source.kwargs.items())
    kind = spec.images if _is_image(loaded) else "token ids"
    return (
        f"model {source.label}{options} ({source.dtype}, {_weights(source)}); "
        f"example inputs: batch {spec.batch_size}, {kind}"
    )


def _weights(source: Any) -> str:
    if source.weights is not None:
        return f"weights from {source.weights}"
    if source.kind == "transformers" and not holds_weights(Path(source.name)):
        return f"random weights, seed {source.seed}"
    if source.kind in ("zoo", "transformers"):
        return "its own weights"
    if source.pretrained:
        return "pretrained weights"
    return f"random weights, seed {source.seed}"


def _is_image(loaded: Loaded) -> bool:
    inputs = loaded.inputs
    return not (isinstance(inputs, dict) and "input_ids" in inputs)


def _spectrum_table(curves: list[Any], atoms: int | None) -> str:
    headers = ["group", "role", "blocks", "shape"]
    headers += [f"atoms for {share:.0%}" for share in _SHARES]
    headers += [] if atoms is None else [f"kept at {atoms} atoms"]
    rows = []
    for c in curves:
        row = [c.group, c.role, c.blocks, f"{c.shape[0]}x{c.shape[1]}"]
        row += [c.atoms_for(share) for share in _SHARES]
        row += [] if c.atoms is None else [f"{c.kept(c.atoms):.2%}"]
        rows.append(row)
    return "energy kept as atoms grow (the spectrum)\n" + format_table(headers, rows)
