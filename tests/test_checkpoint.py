"""The plan file's JSON form: written by Checkpoint.to_dict, read back checked."""

import json
from pathlib import Path

import pytest
from conftest import tiny_vit
from masasurgery.passes.plans import plan_of

import masasurgery
from masasurgery.checkpoint import FORMAT_VERSION, Checkpoint, checkpoint_from_dict
from masasurgery.errors import CheckpointError


def _record() -> Checkpoint:
    model = tiny_vit(depth=2)
    conversion = masasurgery.convert(model, atoms=1, verify=False)
    return Checkpoint(
        Path("ckpt"), "VisionTransformer", plan_of(model), conversion.config
    )


def test_the_json_form_reads_back_as_it_was_written():
    record = _record()
    data = json.loads(json.dumps(record.to_dict()))
    again = checkpoint_from_dict(record.directory, data)
    assert again.plan == record.plan and again.config == record.config
    assert again.format_version == FORMAT_VERSION
    assert again.compression is None  # convert, not compress


def test_a_plan_file_without_a_compression_entry_still_reads():
    # Files written before compress recorded its choice have no such key
    data = json.loads(json.dumps(_record().to_dict()))
    del data["compression"]
    assert checkpoint_from_dict(Path("ckpt"), data).compression is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), "not a masasurgery plan"),
        (lambda d: d.update(format_version=FORMAT_VERSION + 1), "Upgrade masasurgery"),
        (lambda d: d["plan"]["projections"][0].update(in_features=True), "in_features"),
        (lambda d: d["plan"]["dictionaries"][0].update(key="a.b"), "without dots"),
        (lambda d: d.update(compression=[0.5]), "compression must be an object"),
    ],
)
def test_a_malformed_plan_file_names_what_is_wrong(edit, message):
    data = json.loads(json.dumps(_record().to_dict()))
    edit(data)
    with pytest.raises(CheckpointError, match=message):
        checkpoint_from_dict(Path("ckpt"), data)
