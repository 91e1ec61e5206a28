"""The command line, run in-process through main() (one test runs the module)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from masasurgery.cli import main
from masasurgery.cli.commands import COMMANDS
from masasurgery.cli.parser import parse_input_size, parse_kwargs
from masasurgery.cli.sources import SOURCE_FILE, ModelSource

TINY = ["vit_tiny_patch16_224", "--model-kwargs", "depth=3,img_size=32,patch_size=8"]
PNG = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)  # exactly one document, or this fails


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny transformers BERT folder, as save_pretrained writes it."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("bert")
    BertForMaskedLM(config).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------
# analyze


def test_analyze_prints_the_groups(capsys):
    code, out, err = run(capsys, "analyze", *TINY)

    assert code == 0
    assert "VisionTransformer: 3 attention blocks in 1 group" in out
    assert "blocks.0.attn .. blocks.2.attn" in out
    assert "masasurgery:" not in err


def test_analyze_json_is_one_document(capsys):
    code, data = run_json(capsys, "analyze", *TINY, "--batch-size", "3")

    assert code == 0 and data["exit_code"] == 0
    assert data["command"] == "analyze"
    assert data["source"]["kwargs"] == {"depth": 3, "img_size": 32, "patch_size": 8}
    assert data["inputs"]["batch_size"] == 3
    assert [g["blocks"] for g in data["analysis"]["groups"]] == [
        ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    ]
    assert data["spectrum"] is None


def test_analyze_spectrum_table_json_and_plot(capsys, tmp_path):
    plot = tmp_path / "figs" / "spectrum.png"
    code, data = run_json(
        capsys, "analyze", *TINY, "--atoms", "2", "--plot", plot, "--roles", "q,v"
    )

    assert code == 0
    assert plot.read_bytes().startswith(PNG)
    assert data["plot"] == str(plot)
    curves = data["spectrum"]
    assert [c["role"] for c in curves] == ["q", "v"]
    for curve in curves:
        assert curve["atoms"] == 2 and len(curve["cumulative"]) == 3
        assert curve["cumulative"][-1] == 1.0
        assert curve["cumulative"] == sorted(curve["cumulative"])

    code, out, _ = run(capsys, "analyze", *TINY, "--spectrum", "--atoms", "2")
    assert "atoms for 90%" in out and "kept at 2 atoms" in out


def test_analyze_transformers_folder_makes_token_ids(capsys, bert_dir):
    code, data = run_json(capsys, "analyze", bert_dir, "--seq-len", "9")

    assert code == 0
    assert data["source"]["kind"] == "transformers"
    assert data["analysis"]["model"] == "BertForMaskedLM"
    assert len(data["analysis"]["groups"][0]["blocks"]) == 3


def test_model_kwargs_as_json_and_repeated(capsys):
    code, data = run_json(
        capsys,
        "analyze",
        "timm:vit_tiny_patch16_224",
        "--model-kwargs",
        '{"depth": 2, "img_size": 32}',
        "--model-kwargs",
        "patch_size=8",
    )

    assert code == 0
    assert data["source"]["kwargs"] == {"depth": 2, "img_size": 32, "patch_size": 8}


def test_weights_file_is_loaded(capsys, tmp_path):
    source = ModelSource("timm", "vit_tiny_patch16_224", {"depth": 2, "img_size": 32})
    model = source.build()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.zero_()
    save_file(model.state_dict(), tmp_path / "w.safetensors")

    base = ["analyze", "vit_tiny_patch16_224", "--spectrum", "--roles", "q"]
    code, out, _ = run(
        capsys,
        *base,
        "--model-kwargs",
        "depth=2,img_size=32",
        "--weights",
        tmp_path / "w.safetensors",
    )
    assert code == 0
    # Block 0's q weight is zero: one atom keeps all the energy
    assert "weights from" in out and "1              1              1" in out

    code, _, err = run(
        capsys,
        *base,
        "--model-kwargs",
        "depth=3,img_size=32",
        "--weights",
        tmp_path / "w.safetensors",
    )
    assert code == 2
    assert "does not fit VisionTransformer" in err


# ---------------------------------------------------------------------------
# convert and verify


def test_convert_ratio_picks_the_atoms_and_reports_them(capsys):
    code, data = run_json(capsys, "convert", *TINY, "--ratio", "0.3")

    assert code == 0 and data["passed"] is True
    choice = data["atoms_choice"]
    assert choice["atoms"] == 2 and choice["reduction"] >= 0.3
    params = data["conversion"]["params"]
    assert params["shared_weights_reduction"] == pytest.approx(choice["reduction"])
    assert data["conversion"]["config"]["atoms"] == 2

    code, out, _ = run(capsys, "convert", *TINY, "--ratio", "0.3", "--no-verify")
    assert "--ratio 0.3: atoms=2 removes 33.33%" in out
    assert "Verification" not in out


def test_convert_out_then_verify_round_trip(capsys, tmp_path):
    out_dir, plot = tmp_path / "ckpt", tmp_path / "conversion.png"
    code, converted = run_json(
        capsys, "convert", *TINY, "--atoms", "2", "--out", out_dir, "--plot", plot
    )

    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "masasurgery.json",
        "model.safetensors",
        SOURCE_FILE,
    ]
    assert plot.read_bytes().startswith(PNG)

    code, verified = run_json(capsys, "verify", out_dir)
    assert code == 0 and verified["passed"] is True
    assert verified["checkpoint"] == str(out_dir.resolve())
    assert verified["config"] == {"atoms": 2, "roles": ["q", "k", "v", "o"]}
    # The reloaded weights give the errors the conversion reported
    before = converted["conversion"]["verification"]["layer_errors"]
    after = verified["verification"]["layer_errors"]
    assert [e["relative_error"] for e in after] == pytest.approx(
        [e["relative_error"] for e in before], abs=1e-6
    )


def test_transformers_folder_round_trip(capsys, tmp_path, bert_dir):
    out_dir = tmp_path / "bert-masa"
    code, converted = run_json(
        capsys, "convert", bert_dir, "--atoms", "3", "--out", out_dir
    )
    assert code == 0
    assert converted["conversion"]["verification"]["task"] == "lm"

    code, verified = run_json(capsys, "verify", out_dir)
    assert code == 0
    assert verified["verification"]["lossless"] is True
    assert verified["verification"]["approximation"]["max_abs"] == 0.0


def test_calibrated_convert_under_a_budget_then_verify(capsys, tmp_path):
    data = tmp_path / "calibration.safetensors"
    save_file({"images": torch.randn(6, 3, 32, 32)}, data)
    out_dir = tmp_path / "ckpt"
    # The budget solver tabulates every (atoms, rank): keep the model narrow
    narrow = "depth=3,img_size=32,patch_size=8,embed_dim=64,num_heads=2"
    code, converted = run_json(
        capsys,
        "convert",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        narrow,
        "--roles",
        "q,v",
        "--ratio",
        "0.5",
        "--calibration",
        data,
        "--out",
        out_dir,
    )

    assert code == 0
    compression = converted["conversion"]["compression"]
    assert compression["target"] == "ratio=0.5"
    assert compression["compression"] >= 0.5
    assert converted["atoms_choice"] is None  # the budget solver chose

    # Per-dictionary atoms and residuals are read back from the plan
    code, verified = run_json(capsys, "verify", out_dir)
    assert code == 0 and verified["verification"]["rewrite_exact"] is True
    assert verified["verification"]["approximation"] == pytest.approx(
        converted["conversion"]["verification"]["approximation"]
    )


def test_calibration_tensors_must_line_up(capsys, tmp_path):
    data = tmp_path / "bad.safetensors"
    save_file(
        {"input_ids": torch.zeros(4, 8), "attention_mask": torch.zeros(3, 8)}, data
    )
    code, _, err = run(capsys, "convert", *TINY, "--atoms", "2", "--calibration", data)

    assert code == 2 and "same number of rows" in err


def test_verify_a_model_converts_it_losslessly(capsys):
    code, out, _ = run(capsys, "verify", *TINY)

    assert code == 0
    assert 'converted now: {"atoms": 3,' in out
    assert "part 1, rewrite exact: PASS" in out
    assert "(classification outputs)" in out and "[PASS]" in out


# ---------------------------------------------------------------------------
# Exit codes


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyze", "vit_tinyy_patch16_224"], "Did you mean vit_tiny_patch16_224"),
        (["analyze", "./no/such/folder"], "is not a folder"),
        (["analyze", "zoo:bert"], "unknown zoo model 'bert'"),
        (["analyze", "torchvision:vit_b_17"], "unknown torchvision model"),
        (["convert", *TINY, "--atoms", "0"], "expected a positive integer"),
        (["convert", *TINY], "one of the arguments --atoms --ratio is required"),
        (["convert", *TINY, "--ratio", "1.5"], "between 0 and 1"),
        (["convert", *TINY, "--ratio", "0.999"], "cannot be reached"),
        (["convert", *TINY, "--atoms", "2", "--roles", "q,x"], "roles must be"),
        (["analyze", *TINY, "--model-kwargs", "dpth=3"], "could not build timm"),
        (["analyze", *TINY, "--model-kwargs", "depth"], "key=value"),
        (["analyze", *TINY, "--input-size", "0"], "expected H, H,W or C,H,W"),
        (
            ["analyze", *TINY, "--images", "photos", "--input-size", "3,32,40"],
            "square RGB",
        ),
        (
            [
                "convert",
                "vit_tiny_patch16_224",
                "--model-kwargs",
                "depth=1,img_size=32",
                "--atoms",
                "1",
            ],
            "no group of two or more",
        ),
        (["convert", *TINY, "--atoms", "2", "--calibration", "."], "no calibration"),
        (
            ["convert", *TINY, "--atoms", "2", "--calibration", "nope.pt"],
            "no such file",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_exits_2_with_one_line_on_stderr(capsys, argv, message):
    code, out, err = run(capsys, *argv)

    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_bad_input_with_json_prints_an_error_document(capsys):
    code, data = run_json(capsys, "analyze", "zoo:bert")

    assert code == 2 and data["exit_code"] == 2
    assert data["error"]["type"] == "ConfigError"
    assert "zoo:dinov2_vits14" in data["error"]["message"]


def test_pretrained_without_weights_fails_clearly(capsys, monkeypatch):
    # No hub here; offline mode makes the lookup fail at once instead of retrying
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = run(capsys, "analyze", "vit_tiny_patch16_224", "--pretrained")

    assert code == 2
    assert "could not load the weights of timm:vit_tiny_patch16_224" in err
    assert "--weights FILE" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_exits_2(capsys):
    code, _, err = run(capsys, "analyze", *TINY, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_checkpoint_errors_exit_2(capsys, tmp_path):
    # A checkpoint without source.json, then options that source.json fixes
    code, _ = run_json(capsys, "convert", *TINY, "--atoms", "2", "--out", tmp_path)
    assert code == 0
    code, _, err = run(capsys, "verify", tmp_path, "--dtype", "bfloat16")
    assert code == 2 and "drop --model-kwargs" in err
    code, _, err = run(capsys, "convert", tmp_path, "--atoms", "2")
    assert code == 2 and "already converted" in err
    (tmp_path / SOURCE_FILE).unlink()
    code, _, err = run(capsys, "verify", tmp_path)
    assert code == 2 and "without source.json" in err


def test_failed_verification_exits_1(capsys, tmp_path):
    # A lossless checkpoint with one atom changed differs from its original
    code, _ = run_json(capsys, "convert", *TINY, "--atoms", "3", "--out", tmp_path)
    assert code == 0
    tensors = load_file(tmp_path / "model.safetensors")
    # (noise: a constant would vanish against LayerNorm's zero-mean input)
    tensors["masa.group0_q.atoms"][0] += torch.randn(192, 192)
    save_file(tensors, tmp_path / "model.safetensors")

    code, out, err = run(capsys, "verify", tmp_path)
    assert code == 1
    assert "lossless conversion differs from the original" in err
    assert "[FAIL]" in out


def test_internal_error_exits_3_and_shows_traceback_with_v(capsys, monkeypatch):
    def broken(args, out):
        raise RuntimeError("something inside broke")

    monkeypatch.setitem(COMMANDS, "analyze", broken)
    code, _, err = run(capsys, "analyze", *TINY)
    assert code == 3
    assert "internal error: RuntimeError: something inside broke" in err
    assert "Traceback" not in err

    code, _, err = run(capsys, "analyze", *TINY, "-v")
    assert code == 3 and "Traceback" in err


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("masasurgery ")
    code, out, _ = run(capsys, "convert", "--help")
    assert code == 0 and "--ratio R" in out and "exit codes:" in out


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "masasurgery", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "analyze" in result.stdout and "3    unexpected internal error" in result.stdout
    )


# ---------------------------------------------------------------------------
# Option parsers


def test_parse_kwargs_keeps_lists_and_strings():
    assert parse_kwargs("img_size=[32, 48],global_pool=avg, depth=3") == {
        "img_size": [32, 48],
        "global_pool": "avg",
        "depth": 3,
    }


def test_parse_input_size_forms():
    assert parse_input_size("32") == (32,)
    assert parse_input_size("1,28,28") == (1, 28, 28)


# ---------------------------------------------------------------------------
# Stumbles of a first run


def test_a_transformers_config_without_weights_is_reported_as_random(capsys, tmp_path):
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    config.save_pretrained(tmp_path)
    code, out, err = run(capsys, "analyze", tmp_path)

    assert code == 0 and "holds no weights file" in err
    assert "(float32, random weights, seed 0)" in out.splitlines()[0]


def test_out_onto_a_file_is_bad_input_before_converting(capsys, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("{}")
    code, out, err = run(capsys, "convert", *TINY, "--atoms", "1", "--out", report)

    assert code == 2 and out == ""
    assert err.count("masasurgery:") == 1 and "is a file" in err
    assert report.read_text() == "{}"


def test_checkpoints_refuse_analyze_and_verify_atoms(capsys, tmp_path):
    code, _ = run_json(capsys, "convert", *TINY, "--atoms", "1", "--out", tmp_path)
    assert code == 0

    code, _, err = run(capsys, "analyze", tmp_path)
    assert code == 2 and "already converted" in err
    assert "analyze its original instead: timm:vit_tiny_patch16_224" in err
    code, _, err = run(capsys, "verify", tmp_path, "--atoms", "2")
    assert code == 2 and "--atoms 2 applies to a MODEL converted now" in err
