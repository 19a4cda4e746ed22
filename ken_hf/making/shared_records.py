"""The pipeline's records in name order, their work shared among the processes of a run.

The one multi-process protocol of every driver that streams: ``ken prune`` under a launcher
(the main process writes the records) and ``KENCallback`` under DDP (every rank rebuilds its
copy of the model from them). ``shared_records`` gives each tensor an owner (``owners_of``),
which processes it (reads, selects, makes the record) and sends the record to the ranks that
receive records, as a small message (mask and changed flags as bits, the kept values'
differences, the fingerprint: never a whole tensor). A receiver takes the records in name
order, its own made in place, the others' from its ``Inbox``; a rank that receives nothing
only processes and sends its share. Alone, it is the plan's records, one after the other.

Memory on a receiver: one tensor's work at a time, plus the records other ranks sent that
wait to be taken (at most ``budget`` bytes).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..storage.delta_codec import BITS_DTYPES, pack_bits, unpack_bits
from .distributed import Inbox, Outbox, Team, share_by_size
from .plan import RESET, WHOLE, TensorPlan, TensorRecord, TensorSpec

# Working memory of the selection, per tensor: half the library default, so that a streamed
# run stays within two copies of the largest tensor and a fixed allowance.
SELECTION_MEMORY = 128 * 2**20
EVERY_RECEIVER = -1  # the owner of a tensor stored whole: each receiver makes its record


def owners_of(plans: Sequence[TensorPlan], sizes: Mapping[str, int], world: int) -> dict[str, int]:
    """The rank that processes each tensor (``EVERY_RECEIVER`` for a tensor stored whole:
    each receiver has it, and it needs no selection).

    Grown tensors go to the main process (their records carry whole rows, which messages do
    not); the others, in name order (the order the receivers take them in), each to the rank
    with the fewest values so far, counting the main process's whole and grown tensors, so
    that no rank runs far ahead of the receivers."""
    whole = [p for p in plans if p.fate == WHOLE]
    grown = [p for p in plans if p.fate != WHOLE and p.base_rows is not None]
    shared = [p for p in plans if p.fate != WHOLE and p.base_rows is None]
    load = [sum(sizes[p.name] for p in whole + grown)] + [0] * (world - 1)
    owners = share_by_size([sizes[p.name] for p in shared], world, load)
    return (
        {p.name: EVERY_RECEIVER for p in whole}
        | {p.name: 0 for p in grown}
        | {p.name: rank for p, rank in zip(shared, owners, strict=True)}
    )


def shared_records(
    plans: Sequence[TensorPlan],
    process: Callable[[TensorPlan], TensorRecord],
    specs: Mapping[str, TensorSpec],
    *,
    team: Team,
    every_rank_receives: bool,
    budget: int,
) -> Iterator[TensorRecord]:
    """Each plan's record in name order, on a receiving rank; a rank that receives nothing
    processes and sends its share, and yields nothing.

    Args:
        plans: every rank's same plan, in name order.
        process: makes the record of one of this rank's tensors.
        specs: ``{name: (shape, dtype)}`` of the fine-tuned tensors (a received record's
            ``finetuned`` is a stand-in of that shape and dtype: no values).
        team: the processes sharing the work (``Team.current()``).
        every_rank_receives: every rank takes every record (else the main process alone).
        budget: bytes of received records held untaken at most (one more when larger).

    Yields:
        ``TensorRecord``: a received record carries no ``finetuned`` values and no added
        rows of a grown tensor (those are the main process's own).

    Raises:
        RankFailedError: another rank failed (its error in the message).
    """
    sizes = {p.name: math.prod(specs[p.name][0]) for p in plans}
    owners = owners_of(plans, sizes, team.world)
    receivers = list(range(team.world)) if every_rank_receives else [0]
    others = [r for r in receivers if r != team.rank]
    if team.rank not in receivers:
        _send_share([p for p in plans if owners[p.name] == team.rank], process, team, others)
        return
    outboxes = [Outbox(team, target) for target in others]
    mine = (team.rank, EVERY_RECEIVER)
    inbox = Inbox(team, [owners[p.name] for p in plans if owners[p.name] not in mine], budget)
    for plan in plans:
        owner = owners[plan.name]
        if owner in mine:
            inbox.check()
            record = _processed(plan, process, outboxes)
            if owner == team.rank and outboxes:
                payload = _payload(record)
                for outbox in outboxes:
                    outbox.send(payload)
        else:
            record = _received(plan, specs[plan.name], inbox.get())
        yield record
        del record
    for outbox in outboxes:
        outbox.flush()


def _processed(
    plan: TensorPlan, process: Callable[[TensorPlan], TensorRecord], outboxes: list[Outbox]
) -> TensorRecord:
    """``process(plan)``; an error is sent to the ``outboxes``' ranks, then raised."""
    try:
        return process(plan)
    except Exception as error:
        for outbox in outboxes:
            outbox.send_error(f"on tensor {plan.name!r}: {type(error).__name__}: {error}")
        raise


def _send_share(
    mine: list[TensorPlan], process: Callable[[TensorPlan], TensorRecord], team: Team, to: list[int]
) -> None:
    """A rank that receives nothing: process the tensors ``mine`` in name order and send
    each record to the ranks ``to`` while the next is processed."""
    outboxes = [Outbox(team, target) for target in to]
    for plan in mine:
        payload = _payload(_processed(plan, process, outboxes))
        for outbox in outboxes:
            outbox.send(payload)
    for outbox in outboxes:
        outbox.flush()


def _payload(record: TensorRecord) -> bytes:
    """What a receiver needs of a ``PRUNED`` or ``RESET`` record: an 8-byte length and a
    JSON header (fingerprint; for a pruned tensor its delta statistics, kept count and array
    sizes), then the mask ``[numel]`` and the changed flags ``[K]`` as packed bits and the
    differences ``[C]``' bytes: about one bit per value plus the kept values' changes."""
    header: dict = {"fingerprint": record.fingerprint}
    arrays: list[bytes] = []
    if record.mask is not None:
        arrays = [
            pack_bits(record.mask),
            pack_bits(record.changed),
            record.difference.numpy().tobytes(),
        ]
        header |= {
            "delta": record.delta,
            "kept": int(record.changed.numel()),
            "sizes": [len(a) for a in arrays],
        }
    text = json.dumps(header).encode()
    return b"".join([struct.pack("<Q", len(text)), text, *arrays])


def _received(plan: TensorPlan, spec: TensorSpec, payload: bytes) -> TensorRecord:
    """The record ``_payload`` sent; ``spec``: the fine-tuned tensor's (shape, dtype)."""
    shape, dtype = spec
    (length,) = struct.unpack_from("<Q", payload)
    header = json.loads(payload[8 : 8 + length])
    # Receivers read only the fine-tuned tensor's shape and dtype: a stand-in, no values.
    finetuned = torch.empty((), dtype=dtype).expand(shape)
    if plan.fate == RESET:
        return TensorRecord(plan, finetuned, fingerprint=header["fingerprint"])
    if plan.base_rows is not None:  # a grown tensor: the mask covers the base's rows
        shape = (plan.base_rows, *shape[1:])
    start, parts = 8 + length, []
    for size in header["sizes"]:
        parts.append(payload[start : start + size])
        start += size
    mask, changed, difference = parts
    return TensorRecord(
        plan,
        finetuned,
        mask=unpack_bits(mask, math.prod(shape)).reshape(shape),
        fingerprint=header["fingerprint"],
        delta=header["delta"],
        changed=unpack_bits(changed, header["kept"]),
        difference=torch.from_numpy(np.frombuffer(difference, dtype=np.uint8).copy()).view(
            BITS_DTYPES[dtype]
        ),
    )
