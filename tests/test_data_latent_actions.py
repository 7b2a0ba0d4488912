"""The hand-off from labelling to the VLA stage: `LatentLabelLayout` written into a dataset's info.json and read
back from the loaded dataset, the record's other fields kept, and a clear error naming the dataset when the record
is missing or incomplete. Also: the streaming factories take the datasets they stream, with the same keywords."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest

from data_fixtures import write_with_writer
from training.data import (
    LABELLING_INFO_KEY,
    FramePairDataset,
    LabellingRecordError,
    LatentLabelLayout,
    load_lerobot_dataset,
    make_streaming_frame_pairs,
    make_streaming_vla_frames,
)

LAYOUT = LatentLabelLayout(codebook_size=8, code_seq_len=4, gap_seconds=0.6, fps=10, quantizer="/models/quantizer")


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout") / "dataset"
    write_with_writer(root, lengths=(4, 3))
    return root


def _set_info(root, update) -> None:
    path = root / "meta/info.json"
    info = json.loads(path.read_text())
    update(info)
    path.write_text(json.dumps(info, indent=4))


def test_layout_round_trip_through_info_json(dataset_root, tmp_path):
    root = shutil.copytree(dataset_root, tmp_path / "dataset")  # a copy: this test writes into its info.json

    record = {"quantizer": {"path": "/old", "weights_sha256": "abc", "codebook_size": 4}, "tool": "labelling"}
    _set_info(root, lambda info: info.update({LABELLING_INFO_KEY: record}))
    _set_info(root, LAYOUT.write)
    written = json.loads((root / "meta/info.json").read_text())[LABELLING_INFO_KEY]
    # The record's other fields are kept, and so is the place of the fields it had.
    assert list(written) == ["quantizer", "tool", "gap_seconds", "fps"] and written["tool"] == "labelling"
    assert written["quantizer"] == {"path": "/models/quantizer", "weights_sha256": "abc", "codebook_size": 8,
                                    "code_seq_len": 4}
    read = LatentLabelLayout.read(load_lerobot_dataset(root))
    assert read == LAYOUT and isinstance(read.fps, float)
    with pytest.raises(AttributeError):
        read.codebook_size = 16  # frozen: a hand-off is read, not edited


def test_a_missing_or_incomplete_record_is_an_error_naming_the_dataset(dataset_root, tmp_path):
    dataset = load_lerobot_dataset(dataset_root)
    with pytest.raises(LabellingRecordError) as caught:
        LatentLabelLayout.read(dataset)
    message = str(caught.value)
    assert str(dataset_root) in message and LABELLING_INFO_KEY in message and "label_latents.py" in message

    info = LAYOUT.write({})
    del info[LABELLING_INFO_KEY]["fps"]
    dataset.meta.info[LABELLING_INFO_KEY] = info[LABELLING_INFO_KEY]  # as if loaded from such a file
    try:
        with pytest.raises(LabellingRecordError, match=r"has no 'fps'"):
            LatentLabelLayout.read(dataset)
    finally:
        del dataset.meta.info[LABELLING_INFO_KEY]


def test_the_streaming_factories_take_their_dataset_and_the_same_keywords(dataset_root):
    def keywords(function):
        parameters = list(inspect.signature(function).parameters.values())[1:]
        return [(p.name, p.default, p.kind) for p in parameters]

    assert keywords(make_streaming_frame_pairs) == keywords(make_streaming_vla_frames)
    source = load_lerobot_dataset(dataset_root)
    with pytest.raises(TypeError, match="takes a FramePairDataset"):
        make_streaming_frame_pairs(source)
    pairs = FramePairDataset(source, gap_seconds=0.1, image_size=8, output="uint8")
    assert sorted(int(item["index"]) for item in make_streaming_frame_pairs(pairs, seed=1)) == list(range(7))
