"""Sharing per-tensor work among the processes of a distributed launcher.

torchrun and ``accelerate launch`` start one process per rank, on one machine or several,
and describe the run in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). ``launched_group`` joins the process group they describe
for the length of a command; ``Team`` is what a job needs of it: this process's rank, the
share of the work (``share_by_size``), messages of host bytes to the main process, and
failures that stop every rank instead of leaving the others waiting.

Messages travel over gloo (host bytes, between any machines); with ``--device cuda`` the
group is ``cpu:gloo,cuda:nccl``, so CUDA tensors would take NCCL and host bytes still gloo.
A rank that fails sends its error to the main process or, if it dies outright, closes its
connections: either way the others stop with ``RankFailedError`` naming it. A rank that hangs
without failing holds the others until the group's timeout (torch's default, 30 minutes).
"""

from __future__ import annotations

import os
import signal
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import KENConfigError

# Set by torchrun and accelerate launch (and by torch.distributed.run on every machine).
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_DATA, _ERROR = 0, 1  # kinds of message


class RankFailedError(ConnectionError):
    """Another process of a distributed run failed (its error in the message), or contact
    with it was lost."""


def share_by_size(sizes: Sequence[int], world: int, load: Sequence[int] | None = None) -> list[int]:
    """The rank (``0 .. world - 1``) of each item: each in turn, in the order given, goes to
    the rank with the least total size so far (lowest rank on ties), starting from ``load``
    (sizes already given to each rank; default none).

    Items in decreasing size give the LPT rule (final totals within 4/3 of the best); items
    in the order they are consumed keep every prefix balanced within the largest item, which
    is what a consumer that takes results in that order needs."""
    totals = list(load) if load is not None else [0] * world
    owners = []
    for size in sizes:
        owner = min(range(world), key=totals.__getitem__)
        totals[owner] += size
        owners.append(owner)
    return owners


@dataclass(frozen=True)
class Launch:
    """This process in a launched run: the ``device`` it works on, its ``rank`` among
    ``world`` processes."""

    device: str
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launcher_world() -> tuple[int, int, int] | None:
    """``(world size, rank, local rank)`` from a launcher's environment, or None when this
    process was started alone (or as the only process of its run)."""
    if not all(os.environ.get(name) for name in LAUNCHER_VARIABLES):
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world < 2:
        return None
    return world, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])


@contextmanager
def launched_group(device: str) -> Iterator[Launch]:
    """For the block, the process group a launcher's environment describes (joined here
    when it has two processes or more and none is joined yet; left at the end), and this
    process's place in it. ``device``: ``"cpu"`` or ``"cuda"`` (then ``cuda:LOCAL_RANK``,
    one GPU per process of a machine) or ``"cuda:i"`` (as given).

    While a joined group lasts, SIGTERM (how a launcher stops the other processes when one
    fails) raises ``SystemExit``, so that files being written are cleaned up."""
    if dist.is_available() and dist.is_initialized():  # the caller's group: used, not left
        yield Launch(device, dist.get_rank(), dist.get_world_size())
        return
    world = launcher_world()
    if world is None:
        yield Launch(device)
        return
    size, rank, local_rank = world
    cuda = torch.device(device).type == "cuda"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if cuda:
        torch.cuda.set_device(torch.device(device))  # where NCCL and bare "cuda" allocate
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        yield Launch(device, rank, size)
        # Every rank done with its messages before any tears the group down: gloo aborts
        # a process whose peer destroys the group while its own work is still in flight.
        dist.barrier()
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


def _stopped(signum, frame) -> None:
    raise SystemExit(f"stopped by the launcher (signal {signum}): another process failed")


@contextmanager
def _contact(peer: str) -> Iterator[None]:
    """Errors of the transport (a ``peer`` that died, a timeout) as ``RankFailedError``."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistBackendError and gloo's errors
        raise RankFailedError(
            f"lost contact with {peer} (its own error, if any, is in its output): "
            f"{' '.join(str(error).split())[:300]}"
        ) from error


@dataclass(frozen=True)
class Team:
    """The processes of the current torch.distributed group sharing one job (or this
    process alone): this process's ``rank`` among ``world``, and the ``group`` that carries
    host bytes (None: the default group, when it speaks gloo)."""

    rank: int = 0
    world: int = 1
    group: dist.ProcessGroup | None = None

    @classmethod
    def current(cls) -> Team:
        """The team of the joined process group, or of this process alone."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return cls()
        # Host bytes need gloo: a group of NCCL alone gets a gloo group beside it.
        group = None if "gloo" in str(dist.get_backend()) else dist.new_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), group)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def together(self, what: str) -> Iterator[None]:
        """Run the block on every rank, then compare notes: an error in it on any rank stops
        every rank (the rank that failed raises its own error, the others
        ``RankFailedError`` naming that rank and its error). ``what``: the block, for the
        message."""
        if self.world == 1:
            yield
            return
        try:
            yield
        except Exception as error:
            self._gather(f"{type(error).__name__}: {error}")
            raise
        failures = [(r, e) for r, e in enumerate(self._gather(None)) if e is not None]
        if failures:
            rank, error = failures[0]
            raise RankFailedError(f"rank {rank} failed {what}: {error}")

    def same(self, value: str, what: str) -> None:
        """Raise ``KENConfigError`` on every rank unless every rank holds the same ``value``
        (``what`` it is, for the message)."""
        if self.world == 1:
            return
        values = self._gather(value)
        if len(set(values)) > 1:
            differing = [r for r, v in enumerate(values) if v != values[0]]
            raise KENConfigError(
                f"ranks {differing} see different {what} from rank 0: every process must "
                "read the same checkpoints with the same settings"
            )

    def _gather(self, value: str | None) -> list[str | None]:
        values: list[str | None] = [None] * self.world
        with _contact("another rank"):
            dist.all_gather_object(values, value, group=self.group)
        return values

    def receive(self, source: int) -> bytes:
        """The next message from rank ``source`` (sent by its ``Outbox``); raises
        ``RankFailedError`` when that rank sent its error instead, or is gone."""
        header = torch.empty(2, dtype=torch.int64)
        with _contact(f"rank {source}"):
            dist.recv(header, src=source, group=self.group)
            kind, size = header.tolist()
            data = torch.empty(size, dtype=torch.uint8)
            if size:
                dist.recv(data, src=source, group=self.group)
        payload = data.numpy().tobytes()
        if kind == _ERROR:
            raise RankFailedError(f"rank {source} failed: {payload.decode()}")
        return payload

    def broadcast(self, value: object) -> object:
        """``value`` of the main process, on every rank."""
        if self.world == 1:
            return value
        values = [value]
        with _contact("rank 0"):
            dist.broadcast_object_list(values, src=0, group=self.group)
        return values[0]


class Outbox:
    """Messages from this rank to rank ``target``, in order, each sent in the background
    while the next is prepared: at most one message in flight besides the one being built."""

    def __init__(self, team: Team, target: int = 0) -> None:
        self._team, self._target = team, target
        self._in_flight: list = []  # (work, tensor) pairs: tensors live until sent

    def send(self, payload: bytes) -> None:
        """Send ``payload`` once the previous message has gone."""
        self._post(_DATA, payload)

    def send_error(self, message: str) -> None:
        """Tell the target that this rank failed, and why (best effort: it may be gone)."""
        try:
            self._post(_ERROR, message.encode())
            self.flush()
        except RankFailedError:
            pass

    def flush(self) -> None:
        """Wait until every message has gone."""
        with _contact(f"rank {self._target}"):
            for work, _ in self._in_flight:
                work.wait()
        self._in_flight = []

    def _post(self, kind: int, payload: bytes) -> None:
        self.flush()
        header = torch.tensor([kind, len(payload)], dtype=torch.int64)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None
        with _contact(f"rank {self._target}"):
            for tensor in (header, data):
                if tensor is not None:
                    work = dist.isend(tensor, dst=self._target, group=self._team.group)
                    self._in_flight.append((work, tensor))


class Inbox:
    """Messages to this rank from the ranks ``sources`` (one entry per message, in the order
    they are taken), received by a background thread while the caller works on its own
    share, so that the other ranks never wait on it; at most ``budget`` bytes are held
    untaken (one message more when a single one is larger), the rest wait in the senders'
    ``Outbox``."""

    def __init__(self, team: Team, sources: Sequence[int], budget: int) -> None:
        self._ready: deque[bytes] = deque()
        self._held = 0
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        if sources:
            # daemon: a thread waiting on a peer never keeps a failed process alive
            thread = threading.Thread(
                target=self._receive, args=(team, list(sources), budget), daemon=True
            )
            thread.start()

    def _receive(self, team: Team, sources: list[int], budget: int) -> None:
        try:
            for source in sources:
                with self._changed:
                    self._changed.wait_for(lambda: self._held < budget or not self._ready)
                payload = team.receive(source)
                with self._changed:
                    self._ready.append(payload)
                    self._held += len(payload)
                    self._changed.notify_all()
        except BaseException as error:  # handed to the caller's thread
            with self._changed:
                self._error = error
                self._changed.notify_all()

    def check(self) -> None:
        """Raise the receiving thread's error (another rank failed), if any."""
        if self._error is not None:
            raise self._error

    def get(self) -> bytes:
        """The next message, once it has come; raises when another rank failed."""
        with self._changed:
            self._changed.wait_for(lambda: self._ready or self._error is not None)
            self.check()
            payload = self._ready.popleft()
            self._held -= len(payload)
            self._changed.notify_all()
        return payload
