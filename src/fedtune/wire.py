"""Messages on the wire: named tensors plus JSON metadata, encoded as safetensors.

Every message exchanged between a client and the server is one safetensors
payload. Tensor data goes in the safetensors body; the message metadata (round,
client id, kind, example counts, metrics, ...) is stored as a single JSON string
under ``__metadata__["fedtune"]`` in the safetensors header, because safetensors
only allows a flat ``str -> str`` metadata map.

Security model: nothing here uses pickle (or ``torch.load``). Decoding goes
through safetensors' own reader (``safetensors.torch.load``), so a malicious
peer can send wrong numbers but never code, and there is one parser of hostile
input, not two. ``decode`` additionally bounds the payload size and, given an
``expect`` spec, rejects payloads whose tensor names, dtypes or shapes differ
from what the receiver asked for, or whose floating tensors hold NaN/Inf.

Why not a faster hand-written reader: one that returned views of the payload
saved little. Measured on 2 shared CPU cores, one torch thread (fp32 split
activations; median): 1 MiB decodes in 0.10 ms with safetensors, 0.11 ms
copying by hand, 0.07 ms as views; 16 MiB in 2.6-2.8 ms, 2.6-2.8 ms and
0.06 ms. A split step over gRPC (benchmarks/split_grpc_latency.py, 5 runs
each) was 5.5 ms vs 5.7 ms for the views at 1 MiB and 71 ms vs 69 ms at
16 MiB: within the run-to-run noise, against 3 ms and 45 ms for a bare gRPC
echo of the same bytes.

``encoded_size`` reproduces the safetensors layout exactly so that traffic can
be accounted for without serialising (and without copying tensors off a GPU).

Why one module of ~560 lines: everything that touches bytes from another party (the encoder, the exact
size, the decoder and every validation of names, dtypes, shapes, values and metadata) stays in one place,
so a check is never done in one path and forgotten in another.
"""

from __future__ import annotations

import cmath
import functools
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Message",
    "WireError",
    "decode",
    "encode",
    "encoded_size",
    "meta_number",
    "spec_of",
]

DEFAULT_MAX_BYTES: int = 4 * 1024**3
"""Largest payload ``decode`` accepts unless told otherwise (4 GiB)."""

META_KEY = "fedtune"
"""Key under the safetensors ``__metadata__`` map that holds the message JSON."""

# safetensors refuses headers longer than this (MAX_HEADER_SIZE in its Rust
# crate); we check it ourselves so that encode and encoded_size agree.
_MAX_HEADER_BYTES = 100_000_000

# Length of the little-endian u64 that prefixes the JSON header.
_PREFIX_BYTES = 8

DEFAULT_MAX_TENSORS = 100_000
"""Most tensors ``decode`` accepts without an ``expect`` spec (an adapter of a 70-layer model has ~1,000)."""

_META_BUDGET_BYTES = 1024**2
"""Header room for the metadata and the safetensors framing when ``expect`` fixes the tensors (1 MiB)."""


def _dtype_table() -> dict[torch.dtype, tuple[str, int]]:
    """Map torch dtypes to (safetensors dtype code, layout rank).

    safetensors lays tensors out sorted by its ``Dtype`` enum in *descending*
    order (the enum is declared in increasing alignment), ties broken by name in
    ascending byte order. The rank below is the position of each code in that
    enum as shipped in safetensors 0.8 (verified against the installed build by
    tests/test_wire.py). Only dtypes that ``safetensors.torch.load`` can read
    back are listed: F8_E8M0 and F4 are writable but not loadable in 0.8.
    """
    ranked = [
        ("bool", "BOOL"),
        ("uint8", "U8"),
        ("int8", "I8"),
        ("float8_e5m2", "F8_E5M2"),
        ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
        ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
        ("int16", "I16"),
        ("uint16", "U16"),
        ("float16", "F16"),
        ("bfloat16", "BF16"),
        ("int32", "I32"),
        ("uint32", "U32"),
        ("float32", "F32"),
        ("complex64", "C64"),
        ("float64", "F64"),
        ("int64", "I64"),
        ("uint64", "U64"),
    ]
    table: dict[torch.dtype, tuple[str, int]] = {}
    for rank, (torch_name, code) in enumerate(ranked):
        # Older torch builds lack the unsigned and float8 dtypes.
        dtype = getattr(torch, torch_name, None)
        if isinstance(dtype, torch.dtype):
            table[dtype] = (code, rank)
    return table


_DTYPES = _dtype_table()


class WireError(ValueError):
    """A message could not be encoded, or a received payload was rejected."""


@dataclass
class Message:
    """Named tensors plus JSON-able metadata, the unit of client/server traffic.

    Attributes:
        tensors: Tensor name to tensor. Any device; any dtype safetensors can
            read back (all but float8_e8m0fnu and float4_e2m1fn_x2).
        meta: JSON-able metadata (str keys; str/int/float/bool/None, lists and
            dicts thereof). Tuples come back as lists after a round trip.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str | None:
        """The message kind (``meta["kind"]``), or None when unset."""
        return self.meta.get("kind")


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Build a ``decode(expect=...)`` spec from reference tensors.

    Args:
        tensors: Reference tensors, e.g. the receiver's own copy of the state
            that the peer is supposed to send back.

    Returns:
        Name to ``(shape, dtype)``.
    """
    return {name: (tuple(int(d) for d in t.shape), t.dtype) for name, t in tensors.items()}


def encode(msg: Message) -> bytes:
    """Serialise a message to safetensors bytes.

    Tensors are detached, moved to the CPU and made contiguous (the message
    itself is not modified); tensors sharing storage are each written in full.
    The bytes are exactly what ``safetensors.torch.save`` would write.

    Args:
        msg: The message to encode.

    Returns:
        The payload; ``len(encode(msg)) == encoded_size(msg)``.

    Raises:
        WireError: A tensor name, tensor or metadata value cannot be encoded.
    """
    meta_json = _meta_json(msg.meta)
    layout = _layout(msg.tensors)
    header, data_len = _header(layout, meta_json)
    # The safetensors layout written directly (one copy of each tensor's bytes, about 3x faster than
    # safetensors.torch.save, which copies twice): u64 header length, the header `_header` rebuilt byte
    # for byte, then the tensors' little-endian bytes in the header's order. tests/test_wire.py checks the
    # result equals safetensors.torch.save's output byte for byte.
    assert sys.byteorder == "little", "the wire is little-endian; this writer copies native bytes"
    parts: list[Any] = [len(header).to_bytes(_PREFIX_BYTES, "little"), header]
    for name, t, _ in layout:
        c = _to_cpu(name, t)
        if c.numel() > 0:
            parts.append(memoryview(c.reshape(-1).view(torch.uint8).numpy()))
    data = b"".join(parts)
    assert len(data) == _PREFIX_BYTES + len(header) + data_len, "tensor bytes do not match the header"
    return data


def encoded_size(msg: Message) -> int:
    """Exact byte length of ``encode(msg)``, without serialising anything.

    Only shapes, dtypes, names and metadata are read, so this is cheap for
    large messages and never copies tensors off an accelerator.

    Args:
        msg: The message to measure.

    Returns:
        ``len(encode(msg))``.

    Raises:
        WireError: The message cannot be encoded (same checks as ``encode``).
    """
    header, data_len = _header(_layout(msg.tensors), _meta_json(msg.meta))
    return _PREFIX_BYTES + len(header) + data_len


def decode(
    data: bytes,
    *,
    expect: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_extra: bool = False,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> Message:
    """Parse and validate a payload received from a peer.

    Checks, in order: payload size, header size and tensor count (read off the header's bytes before
    anything is parsed: bounded by ``expect`` when given, else by safetensors' 100 MB header limit and
    ``max_tensors``), safetensors validity, metadata validity,
    then (with ``expect``) the tensor name set, each tensor's dtype and shape,
    and that every floating/complex tensor is finite.

    Args:
        data: The received payload.
        expect: Required tensors as name to ``(shape, dtype)``, e.g. from
            ``spec_of``. None skips the tensor checks.
        max_bytes: Payloads longer than this are rejected before parsing.
        allow_extra: Accept (and return) tensors that ``expect`` does not name.
        max_tensors: Most tensors accepted when ``expect`` does not fix the count.

    Returns:
        The decoded message; tensors are on the CPU and own writable memory
        (one copy of the payload's bytes each).

    Raises:
        WireError: The payload is oversized, malformed, or does not match
            ``expect``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"payload must be bytes, got {type(data).__name__}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise WireError(f"max_bytes must be a positive int, got {max_bytes!r}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise WireError(
            f"payload is {size} bytes, over the limit of {max_bytes} bytes; "
            "pass a larger max_bytes if this peer legitimately sends messages this big"
        )
    if not isinstance(data, bytes):
        data = bytes(data)
    _check_bounds(data, expect, allow_extra, max_tensors)
    tensors, header = _load(data)
    meta = _read_meta(header)
    if expect is not None:
        _check_tensors(tensors, expect, allow_extra)
    return Message(tensors=tensors, meta=meta)


def check(
    msg: Message,
    expect: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    allow_extra: bool = False,
) -> Message:
    """Validate an already-decoded message against ``expect`` (names, dtypes, shapes, finite values).

    ``decode(..., expect=...)`` runs the same checks; servers call this directly
    so that a runtime which hands messages over without bytes is validated too.

    Raises:
        WireError: The message does not match ``expect``.
    """
    _check_tensors(msg.tensors, expect, allow_extra)
    return msg


# --------------------------------------------------------------------------- #
# Encoding helpers
# --------------------------------------------------------------------------- #


def _meta_json(meta: Any) -> str:
    """Validate metadata and serialise it to compact JSON."""
    if not isinstance(meta, dict):
        raise WireError(f"Message.meta must be a dict, got {type(meta).__name__}")
    _check_jsonable(meta, "meta")
    # ensure_ascii=False keeps the header compact and readable; NaN/Inf are
    # allowed (Python's json reads them back) because a diverged loss is a
    # legitimate metric to report.
    text = json.dumps(meta, ensure_ascii=False, separators=(",", ":"))
    _check_utf8(text, "Message.meta")
    return text


def _check_jsonable(value: Any, path: str) -> None:
    """Raise WireError naming the first value that JSON would mangle or reject."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                # json.dumps would silently turn 1 into "1"; refuse rather than
                # let the round trip change the data.
                raise WireError(f"{path} has a non-str key {key!r}; metadata dict keys must be str")
            _check_jsonable(item, f"{path}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_jsonable(item, f"{path}[{i}]")
        return
    raise WireError(
        f"{path} has type {type(value).__name__}, which is not JSON-able; convert it to "
        "str/int/float/bool/None or a list/dict of those (e.g. float(x) for numpy scalars, "
        "send tensors in Message.tensors)"
    )


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise WireError(f"{what} contains a character that is not valid UTF-8 ({exc.reason}): {text!r:.80}") from exc


def _json_str(text: str) -> str:
    """JSON string literal exactly as serde_json (used by safetensors) writes it.

    Both Python's json (ensure_ascii=False) and serde_json escape only '"',
    '\\' and U+0000..U+001F (\\b \\t \\n \\f \\r short forms, else a lowercase
    \\u00xx) and write every other code point as raw UTF-8.
    """
    return json.dumps(text, ensure_ascii=False)


def _layout(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, str]]:
    """Validate tensors and return (name, tensor, dtype code) in safetensors order."""
    if not isinstance(tensors, Mapping):
        raise WireError(f"Message.tensors must be a dict of name -> tensor, got {type(tensors).__name__}")
    rows = []
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise WireError(f"tensor names must be str, got {name!r}")
        if name == "__metadata__":
            raise WireError("tensor name '__metadata__' is reserved by safetensors; rename the tensor")
        _check_utf8(name, "tensor name")
        if not isinstance(t, torch.Tensor):
            raise WireError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise WireError(f"tensor {name!r} has layout {t.layout}; call .to_dense() before sending")
        if t.dtype not in _DTYPES:
            supported = ", ".join(str(d) for d in _DTYPES)
            raise WireError(f"tensor {name!r} has dtype {t.dtype}, which the wire cannot carry; use one of {supported}")
        code, rank = _DTYPES[t.dtype]
        rows.append((rank, name, t, code))
    # Descending dtype rank, then ascending name. Python compares str by code
    # point, which is the same order as Rust's byte-wise UTF-8 comparison.
    rows.sort(key=lambda r: (-r[0], r[1]))
    return [(name, t, code) for _, name, t, code in rows]


def _header(layout: list[tuple[str, torch.Tensor, str]], meta_json: str) -> tuple[bytes, int]:
    """Rebuild the padded safetensors JSON header of a `_layout`; return it and the data length."""
    entries, offset = _tensor_entries(tuple((name, code, t.shape, t.numel() * t.element_size())
                                            for name, t, code in layout))
    parts = ['{"__metadata__":{', _json_str(META_KEY), ":", _json_str(meta_json), "}", entries, "}"]
    header = "".join(parts).encode("utf-8")
    # safetensors pads the header with spaces so tensor data starts 8-aligned.
    header += b" " * (-len(header) % _PREFIX_BYTES)
    if len(header) > _MAX_HEADER_BYTES:
        raise WireError(
            f"safetensors header would be {len(header)} bytes, over safetensors' limit of "
            f"{_MAX_HEADER_BYTES}; send fewer tensors or less metadata per message"
        )
    return header, offset


@functools.lru_cache(maxsize=64)
def _tensor_entries(signature: tuple[tuple[str, str, torch.Size, int], ...]) -> tuple[str, int]:
    """The header's tensor entries for ``(name, dtype code, shape, nbytes)`` rows in layout order, and the data
    length. Cached: a sender repeats one layout message after message (split learning's activations every
    step, an adapter every round), and only the metadata before these entries changes."""
    parts = []
    offset = 0
    for name, code, shape, nbytes in signature:
        dims = ",".join(str(int(d)) for d in shape)
        parts.append(f',{_json_str(name)}:{{"dtype":"{code}","shape":[{dims}],'
                     f'"data_offsets":[{offset},{offset + nbytes}]}}')
        offset += nbytes
    return "".join(parts), offset


def _to_cpu(name: str, t: torch.Tensor) -> torch.Tensor:
    """A detached, dense, contiguous CPU copy (or view) of a tensor, as its bytes go on the wire."""
    if t.device.type == "meta":
        raise WireError(f"tensor {name!r} is on the meta device and has no data to send")
    # resolve_conj/neg: lazy conjugate/negative views would otherwise be
    # written as their un-negated underlying memory.
    return t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()


# --------------------------------------------------------------------------- #
# Decoding helpers
# --------------------------------------------------------------------------- #


def _load(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a payload with safetensors' own reader; return its tensors and its JSON header.

    ``safetensors.torch.load`` validates the layout (header length within the payload and under its
    100 MB limit, a JSON object with ``str -> str`` metadata, known dtypes, offsets that tile the data
    exactly, sizes that match the shapes, products that fit in 64 bits) and copies each tensor once into
    its own writable buffer. Whatever it or torch raises on a hostile payload (a SafetensorError, a
    KeyError for a dtype it can write but not load, a RuntimeError for a shape torch refuses) becomes a
    WireError. Only then is the header's JSON read again here, for the metadata: it is the header
    safetensors has just accepted, so its length is bounded and its nesting shallow.
    """
    def invalid(why: str) -> WireError:
        return WireError(f"payload is not valid safetensors ({why})")

    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # noqa: BLE001 - hostile input: every failure is a rejection, never a crash
        raise invalid(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    for name, t in tensors.items():
        if t.ndim > _MAX_DIMS:  # torch builds them, but no peer of ours sends one: refuse before any math on it
            raise invalid(f"tensor {name!r} has {t.ndim} dimensions, more than {_MAX_DIMS}")
    n = int.from_bytes(data[:_PREFIX_BYTES], "little")
    try:
        header = json.loads(data[_PREFIX_BYTES : _PREFIX_BYTES + n].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise invalid(f"header is not UTF-8 JSON: {type(exc).__name__}: {exc}") from exc
    if not isinstance(header, dict):
        raise invalid("the header is not a JSON object")
    return tensors, header


_MAX_DIMS = 64
"""Most dimensions a received tensor may have (real tensors have a handful)."""


def _check_bounds(data: bytes, expect, allow_extra: bool, max_tensors: int) -> None:
    """Refuse a payload whose header is too long or names too many tensors, before any parsing.

    A header of 1.5 million empty tensors (85 MB) took safetensors 23 s and 1.7 GB to parse before the
    expected-tensor check could reject it. Every tensor entry holds the key ``"data_offsets"`` once, so
    counting that byte string (one pass, no allocation) bounds the tensor count; names that contain it
    only make the count larger, never smaller.
    """
    if len(data) < _PREFIX_BYTES:
        raise WireError(f"payload is not valid safetensors (only {len(data)} bytes)")
    n = int.from_bytes(data[:_PREFIX_BYTES], "little")
    if expect is not None and not allow_extra:
        # A few extra tensors are left to the full check, whose message names them.
        limit_tensors = len(expect) + 64
        # Each entry: its JSON-escaped name, dtype, shape digits and offsets (two u64 of up to 20 digits).
        limit_header = _META_BUDGET_BYTES + sum(len(_json_str(k)) + 96 + 21 * len(shape)
                                                for k, (shape, _) in expect.items()) + 64 * 1024
    else:
        limit_tensors, limit_header = max_tensors, _MAX_HEADER_BYTES
    limit_header = min(limit_header, _MAX_HEADER_BYTES)
    if n > limit_header or n > len(data) - _PREFIX_BYTES:
        raise WireError(f"payload header is {n} bytes, over the limit of {min(limit_header, len(data) - 8)} "
                        "bytes for this message (the expected tensors plus 1 MiB of metadata)")
    count = data.count(b'"data_offsets"', _PREFIX_BYTES, _PREFIX_BYTES + n)
    if count > limit_tensors:
        raise WireError(f"payload holds {count} tensors, more than the {limit_tensors} this message may have")


def meta_number(msg: Message, key: str, *, integer: bool = False, maximum: float | None = None) -> float:
    """A finite number from a received message's metadata; `WireError` otherwise.

    Refuses what JSON lets through but no sender of ours writes: booleans, strings such as ``"7"``,
    ``1e999`` (read as infinity), NaN. With ``integer``: a positive whole number, at most 2**53 (beyond
    it a float no longer holds every integer; ``10**400`` is refused here, not as an OverflowError later).
    """
    value = msg.meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"{msg.kind} meta {key!r} must be a number, got {type(value).__name__} {value!r:.60}")
    if integer:
        if isinstance(value, float) and not (math.isfinite(value) and value == int(value)):
            raise WireError(f"{msg.kind} meta {key!r} must be a whole number, got {value!r}")
        if not 1 <= value <= 2**53:
            raise WireError(f"{msg.kind} meta {key!r} must be an integer in [1, 2**53], got {value!r:.60}")
        value = int(value)
    elif not math.isfinite(value):
        raise WireError(f"{msg.kind} meta {key!r} must be a finite number, got {value!r}")
    if maximum is not None and value > maximum:
        raise WireError(f"{msg.kind} meta {key!r} = {value!r:.60} is over the limit of {maximum!r}")
    return value


def _read_meta(header: dict[str, Any]) -> dict[str, Any]:
    """Extract the fedtune metadata from a validated safetensors header (`_load`)."""
    st_meta = header.get("__metadata__")
    if not isinstance(st_meta, dict) or not isinstance(st_meta.get(META_KEY), str):
        raise WireError(
            f"payload is safetensors but not a fedtune message: header lacks __metadata__[{META_KEY!r}]"
        )
    try:
        meta = json.loads(st_meta[META_KEY])
    except Exception as exc:
        raise WireError(f"message metadata is not valid JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise WireError(f"message metadata must be a JSON object, got {type(meta).__name__}")
    return meta


def _summarise(problems: list[str], limit: int = 5) -> str:
    shown = "; ".join(problems[:limit])
    more = len(problems) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


def _check_tensors(
    tensors: Mapping[str, torch.Tensor],
    expect: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    allow_extra: bool,
) -> None:
    """Raise WireError unless tensors match the expected names, dtypes, shapes, finiteness."""
    missing = sorted(set(expect) - set(tensors))
    extra = sorted(set(tensors) - set(expect))
    if missing or (extra and not allow_extra):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} expected tensor(s): {_summarise([repr(n) for n in missing])}")
        if extra and not allow_extra:
            parts.append(
                f"{len(extra)} unexpected tensor(s): {_summarise([repr(n) for n in extra])} "
                "(pass allow_extra=True to accept them)"
            )
        raise WireError("received tensors do not match the expected set: " + "; ".join(parts))

    problems = []
    for name in sorted(expect):
        shape, dtype = expect[name]
        got = tensors[name]
        if got.dtype != dtype:
            problems.append(f"tensor {name!r}: expected dtype {dtype}, received {got.dtype}")
        elif tuple(got.shape) != tuple(shape):
            problems.append(f"tensor {name!r}: expected shape {tuple(shape)}, received {tuple(got.shape)}")
    if problems:
        raise WireError("received tensors do not match the expected spec: " + _summarise(problems))

    for name in sorted(tensors):
        t = tensors[name]
        bad = _count_nonfinite(t)
        if bad:
            problems.append(f"tensor {name!r} holds {bad} NaN/Inf value(s) out of {t.numel()}")
        elif t.dtype == torch.bool and t.numel() and int(t.view(torch.uint8).max()) > 1:
            # safetensors reads any byte into a bool tensor; torch then computes with values other than 0/1.
            problems.append(f"bool tensor {name!r} holds bytes other than 0 and 1")
    if problems:
        raise WireError("received non-finite numbers: " + _summarise(problems))


def _count_nonfinite(t: torch.Tensor) -> int:
    if not (t.dtype.is_floating_point or t.dtype.is_complex) or t.numel() == 0:
        return 0
    if t.element_size() == 1:
        # isfinite has no kernel for most float8 types; float32 holds them exactly.
        t = t.to(torch.float32)
    # Fast path: any NaN/Inf makes the sum NaN/Inf, so a finite sum proves every value finite (a sum that
    # merely overflows falls through to the exact count). On CPU this is ~20x faster than isfinite, which
    # dominated the split service's per-step latency (tests/test_wire.py covers both paths).
    # Summed in float32 at least: a float16 sum of ordinary values overflows past 65504.
    total = t.sum(dtype=torch.float32) if t.is_floating_point() and t.element_size() < 4 else t.sum()
    if cmath.isfinite(total.item()):  # a Python scalar test: a tensor isfinite costs ~10 us more per call
        return 0
    return int((~torch.isfinite(t)).sum().item())

