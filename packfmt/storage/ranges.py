"""Turning many small byte ranges into few ranged requests.

A batch of samples is a list of ``(offset, length)`` ranges inside one object, in
the order the caller asked for them. Object stores charge per request and add tens
of milliseconds of latency to each one, so neighbouring ranges are merged into one
request when the hole between them is at most ``max_gap`` bytes and the merged
request stays within ``max_request`` bytes. A single range longer than
``max_request`` is split into parts that are fetched in parallel and joined.

>>> plan = coalesce([(100, 10), (0, 10), (15, 5)], max_gap=8, max_request=1 << 20)
>>> plan.requests
[(0, 20), (100, 10)]
>>> [(p.request, p.start) for p in plan.pieces]
[(1, 0), (0, 0), (0, 15)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

Range = Tuple[int, int]

DEFAULT_MAX_GAP = 256 << 10       # bytes of hole worth reading to save a request
DEFAULT_MAX_REQUEST = 8 << 20     # largest single ranged GET


@dataclass(frozen=True)
class Piece:
    """Where one requested range lives: request ``request``, bytes ``start .. start+length``.

    ``request`` is -1 for a zero-length range (no request needed).
    """

    request: int
    start: int
    length: int


@dataclass(frozen=True)
class Plan:
    requests: List[Range]   # sorted, disjoint, each non-empty
    pieces: List[Piece]     # one per input range, in input order

    @property
    def bytes_requested(self) -> int:
        return sum(n for _, n in self.requests)


def _validate(ranges: Sequence[Range]) -> None:
    for off, n in ranges:
        if off < 0 or n < 0:
            raise ValueError(f"invalid byte range (offset={off}, length={n})")


def coalesce(ranges: Sequence[Range], max_gap: int = DEFAULT_MAX_GAP,
             max_request: int = DEFAULT_MAX_REQUEST) -> Plan:
    """Plan the requests that cover ``ranges``.

    Invariants (tested with hypothesis in ``tests/test_storage.py``):
    every byte of every non-empty input range is covered by exactly one request;
    requests are sorted and do not overlap; a merged request never exceeds
    ``max_request`` unless it is a single input range (or overlapping input ranges)
    that is itself longer — those are split later by :func:`split`; two
    consecutive requests are either separated by more than ``max_gap`` bytes or
    merging them would exceed ``max_request``.
    """
    if max_gap < 0:
        raise ValueError("max_gap must be >= 0")
    if max_request <= 0:
        raise ValueError("max_request must be > 0")
    ranges = [(int(o), int(n)) for o, n in ranges]
    _validate(ranges)
    order = sorted((i for i, (_, n) in enumerate(ranges) if n > 0), key=lambda i: ranges[i][0])

    requests: List[List[int]] = []          # [start, end)
    owner = [-1] * len(ranges)
    for i in order:
        off, n = ranges[i]
        end = off + n
        if requests:
            cur = requests[-1]
            if end <= cur[1]:               # fully inside the current request
                owner[i] = len(requests) - 1
                continue
            if off < cur[1]:                # overlaps: must merge, whatever the size
                cur[1] = end
                owner[i] = len(requests) - 1
                continue
            if off - cur[1] <= max_gap and end - cur[0] <= max_request:
                cur[1] = end
                owner[i] = len(requests) - 1
                continue
        requests.append([off, end])
        owner[i] = len(requests) - 1

    pieces = []
    for i, (off, n) in enumerate(ranges):
        r = owner[i]
        if r < 0:
            pieces.append(Piece(-1, 0, 0))
        else:
            pieces.append(Piece(r, off - requests[r][0], n))
    return Plan([(s, e - s) for s, e in requests], pieces)


def split(offset: int, length: int, max_request: int) -> List[Range]:
    """Cut one request into parts of at most ``max_request`` bytes (parallel GETs)."""
    if length <= max_request:
        return [(offset, length)]
    return [(o, min(max_request, offset + length - o))
            for o in range(offset, offset + length, max_request)]


def assemble(plan: Plan, payloads: Sequence) -> list:
    """Cut the fetched ``payloads`` (one per ``plan.requests``) into the input ranges.

    A piece that is a whole request is returned without a copy.
    """
    out = []
    for p in plan.pieces:
        if p.request < 0:
            out.append(b"")
            continue
        buf = payloads[p.request]
        if p.start == 0 and p.length == len(buf):
            out.append(buf)
        else:
            out.append(bytes(memoryview(buf)[p.start:p.start + p.length]))
    return out
