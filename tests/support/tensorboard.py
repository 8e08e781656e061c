"""Reading back a run folder's TensorBoard event file without TensorBoard."""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the folder's event file (TFRecord framing, tensorboardX's Event proto)."""
    (path,) = folder.glob("events.out.tfevents.*")
    data, offset, scalars = path.read_bytes(), 0, {}
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4  # length, its CRC, the record, its CRC
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, round(value.simple_value, 5)))
    return scalars
