"""Who is which worker rank: ranks are bound to ZeroMQ peer identities by their handshake, never by what later messages claim.

A rank connects twice (its result socket and its heartbeat socket) and says
`WorkerHello` on each.  A message from an identity that never said hello is
not from a rank.  The connection (file descriptor) a hello arrived on is
remembered, so a socket disconnect event names the rank that went away.
"""

from __future__ import annotations


class WorkerPeers:
    """Identity -> rank and connection -> identity maps of the worker result socket."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._ranks: dict[bytes, int] = {}
        self._identities: dict[int, bytes] = {}  # connection fd -> identity

    def refusal(self, rank: int, world_size: int) -> str | None:
        """Why a hello claiming `rank` of `world_size` cannot be from a rank of this group, or None."""
        if world_size != self.world_size:
            return f"world size {world_size} != {self.world_size}"
        if not 0 <= rank < world_size:
            return f"rank {rank} outside 0..{world_size - 1}"
        return None

    def hello(self, identity: bytes, fd: int, rank: int) -> None:
        self._ranks[identity] = rank
        if fd >= 0:
            self._identities[fd] = identity

    def rank_of(self, identity: bytes) -> int | None:
        return self._ranks.get(identity)

    def disconnected(self, fd: int) -> int | None:
        """The rank whose connection `fd` closed (and forget that identity), or None for a peer that was no rank."""
        identity = self._identities.pop(fd, None)
        return None if identity is None else self._ranks.pop(identity, None)

    def forget_rank(self, rank: int) -> None:
        """Drop every identity of `rank` (the group was stopped; a restarted rank says hello again)."""
        for identity in [i for i, r in self._ranks.items() if r == rank]:
            del self._ranks[identity]
        for fd in [fd for fd, i in self._identities.items() if i not in self._ranks]:
            del self._identities[fd]
