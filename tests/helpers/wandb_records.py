"""Read the records of a W&B offline run file (`run-<id>.wandb`) as W&B wrote them.

The file is a LevelDB-style log (W&B's own header, 32 KiB blocks, 7-byte record headers,
records split FIRST/MIDDLE/LAST across blocks) of `wandb_internal_pb2.Record` messages.
wandb 0.31's Python package no longer ships a reader, so the tests carry this small one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    offset, pending = HEADER, b""
    while offset + HEADER <= len(raw):
        if BLOCK - offset % BLOCK < HEADER:  # block trailer too small for a header: padding
            offset += BLOCK - offset % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[offset:offset + HEADER])
        payload = raw[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_run(run_dir: Path) -> dict:
    """History rows by step, the config, and the run id of the one offline run under run_dir/wandb."""
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    history, config, run_id = {}, {}, None
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            run_id = record.run.run_id
    return {"history": history, "config": config, "run_id": run_id, "path": path}
