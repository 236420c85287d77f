"""The gateway's side of the tokenizer pool: membership, load balancing and failover.

Tokenizer processes connect to this ROUTER socket and join with a
`TokenizerHello`; a member is its socket identity, so messages from a peer
that never said hello are ignored.  A member that misses heartbeats for
`heartbeat_timeout` seconds (or says goodbye) leaves.  Work
moves off a lost member instead of being lost with it: tokenization jobs are
re-sent to another member, and each detokenization session is re-opened on
another member with the ids it had already turned into text (`replay_ids`),
followed by the items still unanswered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from services.common.codec import ProtocolError
from services.common.protocol import (
    DetokClose,
    DetokDelta,
    DetokItem,
    DetokOpen,
    DetokParams,
    DetokResult,
    DetokTokens,
    Heartbeat,
    Tokenize,
    TokenizedText,
    TokenizeResult,
    TokenizerGoodbye,
    TokenizerHello,
    token_ids,
)
from services.common.zmq_io import async_recv_from, make_socket, send_to_nowait

log = logging.getLogger(__name__)


class TokenizerUnavailable(RuntimeError):
    """No tokenizer process joined the pool in time."""


class TokenizerFailed(RuntimeError):
    """The tokenizer reported an error for this input."""


@dataclass
class Member:
    identity: bytes
    name: str
    last_seen: float
    jobs: set[int] = field(default_factory=set)
    sessions: set[str] = field(default_factory=set)
    handled: int = 0

    @property
    def load(self) -> int:
        return len(self.jobs) + len(self.sessions)


@dataclass
class Job:
    message: Tokenize
    future: asyncio.Future
    member: bytes | None = None


@dataclass
class Session:
    request_id: str
    params: DetokParams
    on_delta: Callable[[DetokDelta], None]
    member: bytes | None = None
    confirmed_ids: list[int] = field(default_factory=list)
    pending: dict[int, DetokItem] = field(default_factory=dict)  # first_index -> item sent, not answered


class TokenizerPool:
    """Routes tokenization and detokenization work to live tokenizer processes."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, heartbeat_timeout: float = 3.0,
                 join_timeout: float = 30.0) -> None:
        self.sock = make_socket(ctx, zmq.ROUTER, bind=endpoint)
        self.endpoint = endpoint
        self.heartbeat_timeout = heartbeat_timeout
        self.join_timeout = join_timeout
        self.members: dict[bytes, Member] = {}
        # Members dropped for a missed heartbeat (a busy machine, a long pause): they said hello on this
        # connection once, so a later heartbeat from the same identity brings them back.
        self.lapsed: dict[bytes, str] = {}
        self.jobs: dict[int, Job] = {}
        self.sessions: dict[str, Session] = {}
        self._job_ids = itertools.count(1)
        self._joined = asyncio.Event()
        self.on_membership_change: Callable[[], None] = lambda: None
        self.on_handled: Callable[[str], None] = lambda name: None  # a member answered (metrics)

    # ------------------------------------------------------------------ membership

    def _join(self, identity: bytes, name: str) -> None:
        self.lapsed.pop(identity, None)
        self.members[identity] = Member(identity, name, time.monotonic())
        log.info("tokenizer %s joined the pool (%d member(s))", name, len(self.members))
        self._joined.set()
        self.on_membership_change()
        self._reassign_orphans()

    def _leave(self, identity: bytes, why: str) -> None:
        member = self.members.pop(identity, None)
        if member is None:
            return
        if why.startswith("no heartbeat"):
            self.lapsed[identity] = member.name
        log.warning("tokenizer %s left the pool (%s); moving %d job(s) and %d session(s)",
                    member.name, why, len(member.jobs), len(member.sessions))
        if not self.members:
            self._joined.clear()
        for job_id in member.jobs:
            self.jobs[job_id].member = None
        for request_id in member.sessions:
            self.sessions[request_id].member = None
        self.on_membership_change()
        self._reassign_orphans()

    def _least_loaded(self) -> Member | None:
        # Ties go to the member that has handled least, so light sequential traffic still spreads.
        return min(self.members.values(), key=lambda m: (m.load, m.handled), default=None)

    def _reassign_orphans(self) -> None:
        for job_id, job in self.jobs.items():
            if job.member is None and (member := self._least_loaded()):
                self._send_job(job_id, job, member)
        for session in self.sessions.values():
            if session.member is None and (member := self._least_loaded()):
                self._place_session(session, member)

    async def _wait_for_member(self) -> None:
        try:
            await asyncio.wait_for(self._joined.wait(), self.join_timeout)
        except TimeoutError as exc:
            raise TokenizerUnavailable(f"no tokenizer process joined the pool within {self.join_timeout:.0f} s") from exc

    def _send(self, member: Member, message: object) -> None:
        def on_error(exc: BaseException) -> None:
            # Unroutable: its connection closed (process gone); no need to wait for the missed heartbeats.
            if isinstance(exc, zmq.ZMQError) and exc.errno == zmq.EHOSTUNREACH:
                self._leave(member.identity, "connection closed")

        send_to_nowait(self.sock, member.identity, message, f"tokenizer {member.name}", on_error)

    # ------------------------------------------------------------------ tokenization

    def _send_job(self, job_id: int, job: Job, member: Member) -> None:
        job.member = member.identity
        member.jobs.add(job_id)
        self._send(member, job.message)

    async def tokenize(self, texts: list[str], return_tokens: bool = False, return_offsets: bool = False) -> list[TokenizedText]:
        """Encode texts (special tokens added) on the least-loaded tokenizer; retried elsewhere if it dies."""
        if not self.members:
            await self._wait_for_member()
        job_id = next(self._job_ids)
        job = Job(Tokenize(job_id, texts, return_tokens, return_offsets), asyncio.get_running_loop().create_future())
        self.jobs[job_id] = job
        member = self._least_loaded()
        if member is not None:
            self._send_job(job_id, job, member)
        try:
            return await job.future
        finally:
            self.jobs.pop(job_id, None)

    def _on_tokenize_result(self, member: Member, result: TokenizeResult) -> None:
        member.jobs.discard(result.job_id)
        member.handled += 1
        self.on_handled(member.name)
        job = self.jobs.get(result.job_id)
        if job is None or job.future.done() or job.member != member.identity:
            return
        if result.error:
            job.future.set_exception(TokenizerFailed(result.error))
        else:
            job.future.set_result(result.results)

    # ------------------------------------------------------------------ detokenization

    async def open_session(self, request_id: str, params: DetokParams, on_delta: Callable[[DetokDelta], None]) -> None:
        """Start detokenizing a request on one member; its deltas go to `on_delta`."""
        if not self.members:
            await self._wait_for_member()
        session = Session(request_id, params, on_delta)
        self.sessions[request_id] = session
        member = self._least_loaded()
        if member is not None:
            self._place_session(session, member)

    def _place_session(self, session: Session, member: Member) -> None:
        session.member = member.identity
        member.sessions.add(session.request_id)
        self._send(member, DetokOpen(session.request_id, session.params, token_ids(session.confirmed_ids)))
        if session.pending:
            self._send(member, DetokTokens(list(session.pending.values())))

    def feed(self, items: list[DetokItem]) -> None:
        """Send new ids to the members owning their sessions (one message per member)."""
        by_member: dict[bytes, list[DetokItem]] = {}
        for item in items:
            session = self.sessions.get(item.request_id)
            if session is None:
                continue
            session.pending[item.first_index] = item
            if session.member is not None:
                by_member.setdefault(session.member, []).append(item)
        for identity, member_items in by_member.items():
            self._send(self.members[identity], DetokTokens(member_items))

    def close(self, request_id: str) -> None:
        session = self.sessions.pop(request_id, None)
        if session is None or session.member is None or session.member not in self.members:
            return
        member = self.members[session.member]
        member.sessions.discard(request_id)
        self._send(member, DetokClose([request_id]))

    def _on_detok_result(self, member: Member, result: DetokResult) -> None:
        member.handled += 1
        self.on_handled(member.name)
        for delta in result.deltas:
            session = self.sessions.get(delta.request_id)
            if session is None or session.member != member.identity:
                continue  # closed, or moved to another member: that one answers
            item = session.pending.pop(delta.first_index, None)
            if item is None:
                continue
            session.confirmed_ids.extend(item.ids)
            session.on_delta(delta)

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Receive from members and watch their heartbeats until cancelled; ends (with an error) only if one breaks."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch_heartbeats())
            group.create_task(self._receive())

    async def _receive(self) -> None:
        while True:
            try:
                identity, message = await async_recv_from(self.sock)
            except ProtocolError as exc:
                log.warning("dropping bad message from a tokenizer: %s", exc)
                continue
            try:
                self._dispatch(identity, message)
            except Exception:  # one message's bug must not stop the pool serving everyone else
                log.exception("failed to handle a %s from a tokenizer", type(message).__name__)

    def _dispatch(self, identity: bytes, message: object) -> None:
        if isinstance(message, TokenizerGoodbye):
            self.lapsed.pop(identity, None)
            self._leave(identity, "said goodbye")
            return
        member = self.members.get(identity)
        if member is None:
            if isinstance(message, Heartbeat) and identity in self.lapsed:
                self._join(identity, self.lapsed[identity])
            elif not isinstance(message, TokenizerHello):
                log.warning("ignoring a %s from a peer that never joined the pool", type(message).__name__)
                return
            else:
                self._join(identity, message.name)
            member = self.members[identity]
        member.last_seen = time.monotonic()
        if isinstance(message, TokenizeResult):
            self._on_tokenize_result(member, message)
        elif isinstance(message, DetokResult):
            self._on_detok_result(member, message)
        elif not isinstance(message, TokenizerHello | Heartbeat):
            log.warning("unexpected %s from tokenizer %s", type(message).__name__, member.name)

    async def _watch_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_timeout / 3)
            now = time.monotonic()
            for identity, member in list(self.members.items()):
                if now - member.last_seen > self.heartbeat_timeout:
                    self._leave(identity, f"no heartbeat for {self.heartbeat_timeout:.1f} s")
