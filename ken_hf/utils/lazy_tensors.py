"""A read-only mapping of tensors made when they are asked for: pre-trained values read from
a checkpoint a tensor at a time, tensors decoded from a subnetwork file on first use."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping whose tensors are made on each access, ``read(name)``, and never
    held: such as pre-trained values read from a checkpoint a tensor at a time. Iterating
    its items reads every tensor in turn; keys and ``in`` cost nothing."""

    def __init__(self, read: Callable[[str], torch.Tensor], names: Iterable[str]) -> None:
        self._read = read
        self._names = list(names)
        self._known = set(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._read(name)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
