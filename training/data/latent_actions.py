"""Latent-action labels in a LeRobot dataset: the per-frame column, its info.json feature, and the record of how
they were made, read back by the stages after labelling (`LatentLabelLayout`).

Labelling (`training/label_latents.py`) adds to every frame row

    latent_action     (s,) int64, the s codes in [0, |C|) the quantizer's encoder gives the pair (x_t, x_{t+gap});
                      UNLABELLED_CODE (-1) in every slot of the rows of an episode it could not label

and to `meta/info.json` the feature `latent_action_feature(s)` and a record under `LABELLING_INFO_KEY`. The part of
that record the next stages rely on is a `LatentLabelLayout`, written by `LatentLabelLayout.write` and read by
`LatentLabelLayout.read`, nowhere else:

    info["latent_action_labelling"] = {
        "quantizer": {"path": ..., "code_seq_len": s, "codebook_size": |C|, ...},   # ... the model's description
        "gap_seconds": ..., "fps": ...,
        ...                                                                          # the run's description
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import datasets
import pyarrow as pa

from .errors import LabellingRecordError

LATENT_ACTION_KEY = "latent_action"  # the per-frame column (and info.json feature) of the labels
LABELLING_INFO_KEY = "latent_action_labelling"  # info.json record of how the labels were made
UNLABELLED_CODE = -1  # every slot of a row whose episode could not be labelled


def latent_action_feature(code_seq_len: int) -> dict:
    """The `info.json` feature of the labels: int64, one code per slot."""
    return {"dtype": "int64", "shape": [code_seq_len], "names": [f"slot_{i}" for i in range(code_seq_len)]}


def without_latent_actions(table: pa.Table) -> pa.Table:
    """A data table without its `latent_action` column (a dataset labelled before), also dropped from the
    `huggingface` schema metadata, so that new labels can replace it."""
    if LATENT_ACTION_KEY not in table.column_names:
        return table
    table = table.drop_columns([LATENT_ACTION_KEY])
    metadata = dict(table.schema.metadata or {})
    if b"huggingface" in metadata:
        hf = json.loads(metadata[b"huggingface"])
        hf.get("info", {}).get("features", {}).pop(LATENT_ACTION_KEY, None)
        metadata[b"huggingface"] = json.dumps(hf).encode()
    return table.replace_schema_metadata(metadata)


def data_schema_with_latent_actions(schema: pa.Schema, code_seq_len: int) -> pa.Schema:
    """A data schema with `latent_action` appended, and the `huggingface` schema metadata updated so that
    `datasets.load_dataset("parquet", ...)` reads every column back with its type."""
    features = datasets.Features.from_arrow_schema(schema)
    features[LATENT_ACTION_KEY] = datasets.List(datasets.Value("int64"), length=code_seq_len)
    labelled = features.arrow_schema
    metadata = dict(schema.metadata or {})
    metadata[b"huggingface"] = labelled.metadata[b"huggingface"]
    return schema.append(labelled.field(LATENT_ACTION_KEY)).with_metadata(metadata)


# Where each field of a `LatentLabelLayout` lives in the labelling record: (sub-record, or None for the record
# itself; key). The quantizer's sub-record also describes the model (weights digest, sizes), the record the run.
_RECORD_PLACES = {
    "codebook_size": ("quantizer", "codebook_size"),
    "code_seq_len": ("quantizer", "code_seq_len"),
    "gap_seconds": (None, "gap_seconds"),
    "fps": (None, "fps"),
    "quantizer": ("quantizer", "path"),
}


@dataclass(frozen=True)
class LatentLabelLayout:
    """What a labelled dataset's `latent_action` column means: the hand-off from labelling to the VLA stage.

    Attributes:
        codebook_size: |C|, codes are in [0, |C|) (UNLABELLED_CODE aside).
        code_seq_len: s, codes per frame.
        gap_seconds: time between the two frames of each labelled pair.
        fps: frame rate of the labelled dataset (the gap in frames is round(gap_seconds * fps)).
        quantizer: the quantizer that made the labels (its folder).
    """

    codebook_size: int
    code_seq_len: int
    gap_seconds: float
    fps: float
    quantizer: str

    def write(self, info: dict) -> dict:
        """Writes this layout into an `info.json` mapping (in place, and returns it), under `LABELLING_INFO_KEY`.

        The record's other fields are kept, and so is the position of a field the record already has (the file
        reads the same when the values do); a record is created when there is none.
        """
        record = dict(info.get(LABELLING_INFO_KEY) or {})
        for name, (section, key) in _RECORD_PLACES.items():
            value = getattr(self, name)
            if section is None:
                record[key] = value
            else:
                record[section] = {**(record.get(section) or {}), key: value}
        info[LABELLING_INFO_KEY] = record
        return info

    @classmethod
    def read(cls, dataset) -> LatentLabelLayout:
        """The layout recorded in a loaded dataset's `meta.info` (a `LeRobotDataset`, or its metadata).

        Raises `LabellingRecordError`, naming the dataset, when the record is missing or lacks a field.
        """
        meta = getattr(dataset, "meta", dataset)
        where = getattr(dataset, "root", None) or getattr(meta, "root", None) or repr(dataset)
        record = (getattr(meta, "info", None) or {}).get(LABELLING_INFO_KEY)
        if not isinstance(record, dict):
            raise LabellingRecordError(
                where, f"meta/info.json has no {LABELLING_INFO_KEY!r} record, so the dataset's latent actions (if any) "
                "have no known codebook size, gap or quantizer"
            )
        values = {}
        for name, (section, key) in _RECORD_PLACES.items():
            holder = record if section is None else record.get(section)
            if not isinstance(holder, dict) or key not in holder:
                place = key if section is None else f"{section}.{key}"
                raise LabellingRecordError(
                    where, f"the {LABELLING_INFO_KEY!r} record of meta/info.json has no {place!r} (the {name})"
                )
            values[name] = holder[key]
        return cls(
            codebook_size=int(values["codebook_size"]), code_seq_len=int(values["code_seq_len"]),
            gap_seconds=float(values["gap_seconds"]), fps=float(values["fps"]), quantizer=str(values["quantizer"]),
        )
