"""The paper session's record in its output (a folder or s3://bucket/prefix, through controller.stores):

- `session.json`: written once when the session starts: the exchange, pairs and timeframe, the model, its
  sha256, the config's sha256, and the warm-up candles the first decision was taken on;
- `journal/<open ms, 13 digits>.json`: one object per closed bar, never rewritten: one line of canonical JSON
  (nexlify.paper.trader's line plus `prev_sha256`, the sha256 of the line before it, the header's for the
  first), so the concatenation of the objects in key order is the session's journal;
- `snapshots/<open ms>.json`: every few bars, the chain's head and the book at that bar; a restart checks its
  replay against each.

Every object is written atomically (a temporary file renamed, or one S3 put), so a process killed at any
point leaves whole lines only. A line that does not parse, or whose chain or replay disagrees, is named in
an error (exit 2), never skipped.
"""

from __future__ import annotations

import hashlib
import json

from controller.stores.base import StoreKeyMissing
from nexlify.errors import InputError
from nexlify.paper.trader import canonical_json

HEADER_KEY = "session.json"
JOURNAL_PREFIX = "journal/"
SNAPSHOT_PREFIX = "snapshots/"
FORMAT = "nexlify-paper/1"


def line_key(open_ms: int) -> str:
    return f"{JOURNAL_PREFIX}{int(open_ms):013d}.json"


def snapshot_key(open_ms: int) -> str:
    return f"{SNAPSHOT_PREFIX}{int(open_ms):013d}.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Journal:
    """Appends lines to a store and reads them back, checked."""

    def __init__(self, store) -> None:
        self.store = store
        self.head = ""  # sha256 of the last line written (the header's before any)
        self.count = 0

    def url(self, key: str) -> str:
        return self.store.url(key)

    # ------------------------------------------------------------------------------------------ header

    def read_header(self) -> dict | None:
        try:
            data = self.store.read_bytes(HEADER_KEY)
        except (StoreKeyMissing, FileNotFoundError):
            return None
        try:
            header = json.loads(data)
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT}")
        except ValueError as exc:
            raise InputError(f"paper session header {self.url(HEADER_KEY)} is damaged ({exc}); accepted: the "
                             "file as nexlify wrote it, or a new --output") from None
        self.head = sha256(data)
        return header

    def write_header(self, header: dict) -> None:
        data = canonical_json({**header, "format": FORMAT}) + b"\n"
        self.store.write_bytes(HEADER_KEY, data)
        self.head = sha256(data)

    # ------------------------------------------------------------------------------------------- lines

    def append(self, line: dict) -> bytes:
        data = canonical_json({**line, "prev_sha256": self.head}) + b"\n"
        self.store.write_bytes(line_key(line["open_ms"]), data)
        self.head = sha256(data)
        self.count += 1
        return data

    def keys(self) -> list[str]:
        return sorted(k for k in self.store.list(JOURNAL_PREFIX) if k.endswith(".json"))

    def read_lines(self) -> list[tuple[str, bytes, dict]]:
        """Every stored line in order, (key, bytes, parsed), each checked: one JSON object on one line, its
        chain link to the one before, its key matching its bar; InputError naming the first that is not."""
        header_head = self.head
        out = []
        prev = header_head
        for key in self.keys():
            data = self.store.read_bytes(key)
            try:
                if not data.endswith(b"\n") or data.count(b"\n") != 1:
                    raise ValueError("not one whole line")
                line = json.loads(data)
                if not isinstance(line, dict):
                    raise ValueError("not a JSON object")
                if line.get("prev_sha256") != prev:
                    before = out[-1][0] if out else HEADER_KEY
                    raise ValueError(f"its prev_sha256 is not the sha256 of {self.url(before)}: one of the two "
                                     "was changed")
                if key != line_key(line.get("open_ms", -1)):
                    raise ValueError("its bar is not the one its name says")
            except ValueError as exc:
                raise InputError(f"paper journal line {self.url(key)} is damaged ({exc}); accepted: the journal "
                                 "as nexlify wrote it (restore the object, or start a new --output)") from None
            out.append((key, data, line))
            prev = sha256(data)
        return out

    # --------------------------------------------------------------------------------------- snapshots

    def write_snapshot(self, open_ms: int, snapshot: dict) -> None:
        self.store.write_bytes(snapshot_key(open_ms), canonical_json({**snapshot, "journal_head": self.head}) + b"\n")

    def read_snapshots(self) -> dict[int, dict]:
        """{bar open ms: snapshot}; InputError naming one that does not parse."""
        out = {}
        for key in sorted(k for k in self.store.list(SNAPSHOT_PREFIX) if k.endswith(".json")):
            data = self.store.read_bytes(key)
            try:
                snap = json.loads(data)
                if not isinstance(snap, dict) or key != snapshot_key(snap.get("open_ms", -1)):
                    raise ValueError("not a snapshot of the bar its name says")
            except ValueError as exc:
                raise InputError(f"paper snapshot {self.url(key)} is damaged ({exc}); accepted: the snapshot as "
                                 "nexlify wrote it (or delete it: the journal replays without it)") from None
            out[int(snap["open_ms"])] = snap
        return out
