"""Flower messages as a grid leaves them once pushed, built through Flower's public Metadata."""

from __future__ import annotations

import time

from flwr.app import Message, Metadata, RecordDict

from fedcifar_app.compat import MessageType


def metadata(**fields) -> Metadata:
    """Message metadata as a grid leaves it once pushed (every field set)."""
    defaults = {"run_id": 1, "message_id": "", "src_node_id": 0, "reply_to_message_id": "", "group_id": "1"}
    defaults |= {"created_at": time.time(), "ttl": 600.0, "message_type": MessageType.TRAIN}
    return Metadata(**(defaults | fields))


def sent_to(*node_ids: int) -> list[Message]:
    """Train messages as the grid has pushed them: each with its message id."""
    return [
        Message(content=RecordDict(), metadata=metadata(message_id=f"message-to-{node_id}", dst_node_id=node_id))
        for node_id in node_ids
    ]
