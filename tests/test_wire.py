"""Tests for fedtune.wire: round trips, exact size accounting, rejection of bad payloads."""

from __future__ import annotations

import json
import pickle
import random
import struct

import pytest
import safetensors.torch
import torch

from fedtune import wire
from fedtune.wire import DEFAULT_MAX_BYTES, Message, WireError, decode, encode, encoded_size, spec_of

ALL_DTYPES = list(wire._DTYPES)

TRICKY_STRINGS = [
    "",
    "plain",
    'quote"inside',
    "back\\slash",
    "\\\"",
    "new\nline\r\ttab\b\f",
    "\x00\x01\x1f\x7f",
    "ünïcödé",
    "日本語テキスト",
    "emoji 🚀🧪",
    "\u2028\u2029",
    "/slash/",
    "{\"json\": [1, 2]}",
    "__metadata__x",
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor, for bitwise comparison (NaN-safe, any dtype)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert b[name].dtype == a[name].dtype, name
        assert tuple(b[name].shape) == tuple(a[name].shape), name
        assert torch.equal(_bits(b[name]), _bits(a[name])), name


def _make(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 3).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


def _random_name(rng: random.Random) -> str:
    alphabet = "abcxyz._-0129" + '"\\\n\t\x01' + "éü日🚀 "
    if rng.random() < 0.2:
        return rng.choice(TRICKY_STRINGS)
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))


def _random_meta(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if depth > 2 or r < 0.4:
        return rng.choice(
            [rng.randint(-(10**12), 10**12), rng.random() * 1e6, True, False, None, rng.choice(TRICKY_STRINGS)]
        )
    if r < 0.7:
        return [_random_meta(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_random_name(rng): _random_meta(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _random_message(rng: random.Random, gen: torch.Generator) -> Message:
    tensors = {}
    for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 13])):
        ndim = rng.randint(0, 4)
        shape = tuple(rng.choice([0, 1, 2, 3, 7, 16]) for _ in range(ndim))
        tensors[_random_name(rng)] = _make(shape, rng.choice(ALL_DTYPES), gen)
    meta = {_random_name(rng): _random_meta(rng) for _ in range(rng.randint(0, 5))}
    meta["kind"] = rng.choice(["update", "global", "logits"])
    return Message(tensors, meta)


def _header_of(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n]


# --------------------------------------------------------------------------- #
# Round trips and exact size accounting
# --------------------------------------------------------------------------- #


def test_round_trip_values_dtypes_and_meta() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "lora_A": torch.randn(4, 8, generator=gen, dtype=torch.bfloat16),
        "lora_B": torch.randn(8, 4, generator=gen, dtype=torch.float16),
        "w": torch.randn(3, 3, generator=gen),
        "ids": torch.arange(10, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 5),
    }
    meta = {"kind": "update", "round": 7, "client_id": "c-3", "num_examples": 128, "metrics": {"loss": 1.25}}
    msg = Message(tensors, meta)
    out = decode(encode(msg), expect=spec_of(tensors))
    _assert_same_tensors(tensors, out.tensors)
    assert out.meta == meta
    assert out.kind == "update"
    # Received tensors own writable memory (safe to update in place).
    out.tensors["w"].add_(1.0)


def test_every_dtype_round_trips_and_orders_like_safetensors() -> None:
    gen = torch.Generator().manual_seed(1)
    # Same name prefix for all, so the layout order is decided by dtype alone.
    tensors = {f"t{i:02d}": _make((3, 2), d, gen) for i, d in enumerate(ALL_DTYPES)}
    msg = Message(tensors, {"kind": "all-dtypes"})
    data = encode(msg)
    _assert_same_tensors(tensors, decode(data).tensors)
    header = json.loads(_header_of(data))
    laid_out = sorted((v["data_offsets"][0], v["dtype"]) for k, v in header.items() if k != "__metadata__")
    ranks = [wire._DTYPES[tensors[f"t{i:02d}"].dtype][1] for i in range(len(ALL_DTYPES))]
    expected = [wire._DTYPES[ALL_DTYPES[i]][0] for i in sorted(range(len(ranks)), key=lambda i: -ranks[i])]
    assert [code for _, code in laid_out] == expected
    assert len(data) == encoded_size(msg)


def test_meta_round_trip_with_tricky_strings() -> None:
    meta = {s: s for s in TRICKY_STRINGS}
    meta["nested"] = {"list": [1, 2.5, None, True, TRICKY_STRINGS], "nan": float("nan")}
    msg = Message({s or "_": torch.ones(1) for s in TRICKY_STRINGS}, meta)
    data = encode(msg)
    assert len(data) == encoded_size(msg)
    out = decode(data)
    assert out.meta["nested"]["list"] == [1, 2.5, None, True, TRICKY_STRINGS]
    nan = out.meta["nested"].pop("nan")
    assert nan != nan
    meta["nested"].pop("nan")
    assert out.meta == meta


@pytest.mark.parametrize(
    "tensors",
    [
        {},
        {"zero_d": torch.tensor(1.0)},
        {"zero_size": torch.zeros(0)},
        {"zero_size_2d": torch.zeros(3, 0, dtype=torch.bfloat16), "x": torch.ones(2, dtype=torch.int8)},
        {"bf16": torch.randn(5, 7).to(torch.bfloat16)},
        {"mixed_b": torch.ones(3, dtype=torch.uint8), "mixed_a": torch.ones(3, dtype=torch.int64),
         "mixed_c": torch.ones(3, dtype=torch.bool), "mixed_d": torch.ones(3, dtype=torch.float16)},
        {f"layer.{i}.weight": torch.ones(i % 4 + 1) for i in range(200)},
        {"big": torch.zeros(1024, 1024, 3), "wide": torch.zeros(1, 2**20, dtype=torch.int8)},
        {"ünï": torch.ones(2), "日本": torch.ones(2), "🚀": torch.ones(2), "a": torch.ones(2), "Z": torch.ones(2)},
    ],
    ids=["empty", "0d", "zero-size", "zero-size-2d", "bf16", "mixed", "many-names", "large", "unicode-names"],
)
def test_encoded_size_explicit_cases(tensors: dict[str, torch.Tensor]) -> None:
    msg = Message(tensors, {"kind": "update", "round": 1, "note": 'ü"\\\n'})
    data = encode(msg)
    assert encoded_size(msg) == len(data)
    header, data_len = wire._header(wire._layout(msg.tensors), wire._meta_json(msg.meta))
    assert data[8 : 8 + len(header)] == header
    assert len(header) % 8 == 0
    assert data_len == sum(t.numel() * t.element_size() for t in tensors.values())
    _assert_same_tensors(tensors, decode(data).tensors)


def _safetensors_reference(msg: Message) -> bytes:
    """What safetensors itself writes for a message (copies, since it refuses tensors sharing memory)."""
    cpu = {k: v.detach().cpu().resolve_conj().resolve_neg().contiguous().clone() for k, v in msg.tensors.items()}
    return safetensors.torch.save(cpu, metadata={"fedtune": wire._meta_json(msg.meta)})


def test_encode_writes_exactly_what_safetensors_writes() -> None:
    rng = random.Random(99)
    gen = torch.Generator().manual_seed(99)
    cases = [_random_message(rng, gen) for _ in range(200)]
    cases.append(Message({f"t{i:02d}": _make((3, 2), d, gen) for i, d in enumerate(ALL_DTYPES)}, {"k": "dtypes"}))
    shared = torch.arange(12.0)
    cases.append(Message({"a": shared[:6], "b": shared[6:].view(2, 3), "c": shared.view(3, 4).t(),
                          "z": torch.tensor(1 + 2j).conj(), "e": torch.zeros(0, 3)}, {}))
    for case, msg in enumerate(cases):
        assert encode(msg) == _safetensors_reference(msg), f"case {case}: {list(msg.tensors)}"


def test_encoded_size_randomized() -> None:
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    for case in range(300):
        msg = _random_message(rng, gen)
        data = encode(msg)
        assert encoded_size(msg) == len(data), f"case {case}: {list(msg.tensors)} {msg.meta!r}"
        # Stronger than the length: our reconstructed header is byte-identical.
        header, _ = wire._header(wire._layout(msg.tensors), wire._meta_json(msg.meta))
        assert _header_of(data) == header, f"case {case}"
        out = decode(data, expect=spec_of(msg.tensors))
        _assert_same_tensors(msg.tensors, out.tensors)
        assert json.dumps(out.meta, sort_keys=True) == json.dumps(msg.meta, sort_keys=True)


def test_encoded_size_needs_no_data() -> None:
    # Meta tensors have shapes but no storage: sizing must not touch data.
    shapes = {"a": ((128, 64), torch.float32), "b": ((7,), torch.bfloat16), "c": ((), torch.int64)}
    real = Message({k: torch.zeros(s, dtype=d) for k, (s, d) in shapes.items()}, {"kind": "x"})
    meta_dev = Message({k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in shapes.items()}, {"kind": "x"})
    assert encoded_size(meta_dev) == encoded_size(real) == len(encode(real))
    huge = Message({"w": torch.empty(200_000, 100_000, dtype=torch.bfloat16, device="meta")}, {})
    header, _ = wire._header(wire._layout(huge.tensors), wire._meta_json(huge.meta))
    assert encoded_size(huge) == 8 + len(header) + 200_000 * 100_000 * 2
    with pytest.raises(WireError, match="meta device"):
        encode(meta_dev)


def test_encode_normalises_views_and_devices_without_touching_input() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tied = torch.randn(4, 4)
    param = torch.nn.Parameter(torch.randn(2, 2))
    tensors = {
        "transposed": base.t(),  # non-contiguous
        "row": base[1],  # shares storage with "transposed"
        "tied_a": tied,
        "tied_b": tied,  # same tensor twice (tied weights)
        "param": param,  # requires grad
        "conj": torch.randn(3, dtype=torch.complex64).conj(),  # lazy conjugate view
        "neg": torch.randn(3, dtype=torch.complex64).conj().imag,  # lazy negative view
    }
    msg = Message(tensors, {})
    data = encode(msg)
    assert len(data) == encoded_size(msg)
    out = decode(data).tensors
    for name, t in tensors.items():
        assert torch.equal(out[name], t.detach().resolve_conj().resolve_neg()), name
    assert msg.tensors["transposed"].is_contiguous() is False


# --------------------------------------------------------------------------- #
# Rejection of bad payloads
# --------------------------------------------------------------------------- #


@pytest.fixture()
def payload() -> tuple[bytes, dict]:
    tensors = {"a": torch.randn(4, 4), "b": torch.randn(3, dtype=torch.bfloat16), "n": torch.arange(3)}
    return encode(Message(tensors, {"kind": "update", "round": 2})), spec_of(tensors)


def test_tampered_header_rejected(payload: tuple[bytes, dict]) -> None:
    data, expect = payload
    n = struct.unpack("<Q", data[:8])[0]

    def flipped(pos: int, new: bytes) -> bytes:
        return data[:pos] + new + data[pos + 1 :]

    # Structural damage: opening brace, length prefix, a data offset digit, a dtype letter.
    with pytest.raises(WireError, match="not valid safetensors"):
        decode(flipped(8, b"["), expect=expect)
    with pytest.raises(WireError):
        decode(struct.pack("<Q", n + 8) + data[8:], expect=expect)
    header = data[8 : 8 + n]
    offset_pos = 8 + header.index(b'"data_offsets":[') + len(b'"data_offsets":[') + 1
    with pytest.raises(WireError):
        decode(flipped(offset_pos, b"7"), expect=expect)
    dtype_pos = 8 + header.index(b'"dtype":"F32"') + len(b'"dtype":"')
    with pytest.raises(WireError):
        decode(flipped(dtype_pos, b"I"), expect=expect)


def test_fuzzed_header_only_ever_raises_wire_error(payload: tuple[bytes, dict]) -> None:
    # A malicious peer controls every byte; whatever it sends, the receiver gets
    # either a message matching `expect` or a WireError, never another exception.
    data, expect = payload
    n = struct.unpack("<Q", data[:8])[0]
    rng = random.Random(7)
    for pos in range(8 + n):
        for new in (data[pos] ^ 0xFF, rng.randrange(256), ord('"'), ord("}")):
            bad = data[:pos] + bytes([new]) + data[pos + 1 :]
            try:
                out = decode(bad, expect=expect)
            except WireError:
                continue
            assert spec_of(out.tensors) == expect


def test_unknown_dtype_from_peer_rejected() -> None:
    # safetensors can write F8_E8M0 but its torch loader raises KeyError on it.
    data = safetensors.torch.save({"x": torch.zeros(4, dtype=torch.float8_e8m0fnu)}, {"fedtune": "{}"})
    with pytest.raises(WireError, match="not valid safetensors"):
        decode(data)


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 20, -1, -16])
def test_truncated_rejected(payload: tuple[bytes, dict], cut: int) -> None:
    data, expect = payload
    with pytest.raises(WireError):
        decode(data[:cut], expect=expect)


def test_trailing_garbage_rejected(payload: tuple[bytes, dict]) -> None:
    data, expect = payload
    with pytest.raises(WireError):
        decode(data + b"\x00" * 8, expect=expect)


def test_oversize_rejected_before_parsing(payload: tuple[bytes, dict]) -> None:
    data, _ = payload
    assert decode(data, max_bytes=len(data)).kind == "update"
    with pytest.raises(WireError, match="over the limit"):
        decode(data, max_bytes=len(data) - 1)
    # Garbage that is also too big is rejected for its size, i.e. before parsing.
    with pytest.raises(WireError, match="over the limit"):
        decode(b"\xff" * 1000, max_bytes=999)
    assert DEFAULT_MAX_BYTES >= 2**30


def test_wrong_key_set_rejected(payload: tuple[bytes, dict]) -> None:
    data, expect = payload
    with pytest.raises(WireError, match=r"missing 1 expected tensor\(s\): 'c'"):
        decode(data, expect={**expect, "c": ((1,), torch.float32)})
    fewer = {k: v for k, v in expect.items() if k != "n"}
    with pytest.raises(WireError, match=r"1 unexpected tensor\(s\): 'n'.*allow_extra"):
        decode(data, expect=fewer)
    assert set(decode(data, expect=fewer, allow_extra=True).tensors) == {"a", "b", "n"}


def test_wrong_dtype_rejected(payload: tuple[bytes, dict]) -> None:
    data, expect = payload
    with pytest.raises(WireError, match=r"tensor 'b': expected dtype torch.float32, received torch.bfloat16"):
        decode(data, expect={**expect, "b": ((3,), torch.float32)})


def test_wrong_shape_rejected(payload: tuple[bytes, dict]) -> None:
    data, expect = payload
    with pytest.raises(WireError, match=r"tensor 'a': expected shape \(4, 5\), received \(4, 4\)"):
        decode(data, expect={**expect, "a": ((4, 5), torch.float32)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2, torch.complex64])
def test_non_finite_rejected(bad: float, dtype: torch.dtype) -> None:
    x = torch.zeros(10, dtype=dtype)
    x[3] = bad
    tensors = {"ok": torch.ones(2), "x": x}
    data = encode(Message(tensors, {}))
    with pytest.raises(WireError, match=r"tensor 'x' holds 1 NaN/Inf"):
        decode(data, expect=spec_of(tensors))
    # Without a spec the receiver asked for no checks.
    assert decode(data).tensors["x"].shape == (10,)


def test_finite_values_whose_sum_overflows_are_accepted_and_a_nan_among_them_counted() -> None:
    # The finiteness check first sums the tensor; an overflowing sum must fall back to the exact count.
    x = torch.full((8,), 60000.0, dtype=torch.float16)
    assert not torch.isfinite(x.sum())
    assert torch.equal(decode(encode(Message({"x": x}, {})), expect=spec_of({"x": x})).tensors["x"], x)
    x[2] = float("nan")
    with pytest.raises(WireError, match=r"tensor 'x' holds 1 NaN/Inf"):
        decode(encode(Message({"x": x}, {})), expect=spec_of({"x": x}))


def test_nan_in_float8_e4m3fn_rejected() -> None:
    # isfinite has no float8_e4m3fn kernel; the check must still see the NaN.
    x = torch.tensor([0.0, float("nan"), 1.0]).to(torch.float8_e4m3fn)
    data = encode(Message({"x": x}, {}))
    with pytest.raises(WireError, match=r"tensor 'x' holds 1 NaN/Inf"):
        decode(data, expect=spec_of({"x": x}))


def test_not_a_fedtune_message_rejected() -> None:
    plain = safetensors.torch.save({"a": torch.ones(2)})
    with pytest.raises(WireError, match="not a fedtune message"):
        decode(plain)
    for bad_meta in ["not json", "[1, 2]", "3", "[" * 100_000]:
        data = safetensors.torch.save({"a": torch.ones(2)}, {"fedtune": bad_meta})
        with pytest.raises(WireError, match="metadata"):
            decode(data)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(WireError, match="must be bytes"):
        decode("text")  # type: ignore[arg-type]
    data = encode(Message({"a": torch.ones(1)}, {"kind": "k"}))
    assert decode(bytearray(data)).kind == "k"
    assert decode(memoryview(data)).kind == "k"


def test_decode_never_unpickles(monkeypatch: pytest.MonkeyPatch, payload: tuple[bytes, dict]) -> None:
    data, expect = payload

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle must never be used on the wire")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    out = decode(data, expect=expect)
    assert out.kind == "update"
    assert len(encode(out)) == len(data)
    # A pickle payload is simply not safetensors.
    with pytest.raises(WireError):
        decode(pickle.dumps({"a": 1}))


# --------------------------------------------------------------------------- #
# Encode-side mistakes
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (Message({"a": torch.ones(1)}, {1: "x"}), "non-str key"),
        (Message({"a": torch.ones(1)}, {"m": {"deep": torch.ones(1)}}), r"meta\['m'\]\['deep'\] has type Tensor"),
        (Message({"a": torch.ones(1)}, {"s": {1, 2}}), "not JSON-able"),
        (Message({"a": torch.ones(1)}, ["not", "a", "dict"]), "must be a dict"),  # type: ignore[arg-type]
        (Message({"a": torch.ones(1)}, {"s": "\ud800"}), "not valid UTF-8"),
        (Message({"\udcff": torch.ones(1)}, {}), "not valid UTF-8"),
        (Message({"__metadata__": torch.ones(1)}, {}), "reserved"),
        (Message({1: torch.ones(1)}, {}), "names must be str"),  # type: ignore[dict-item]
        (Message({"a": [1.0]}, {}), "not a torch.Tensor"),  # type: ignore[dict-item]
        (Message({"a": torch.zeros(2, dtype=torch.float8_e8m0fnu)}, {}), "wire cannot carry"),
        (Message({"a": torch.eye(2).to_sparse()}, {}), r"\.to_dense\(\)"),
    ],
)
def test_encode_rejects_unsendable(msg: Message, match: str) -> None:
    with pytest.raises(WireError, match=match):
        encode(msg)
    with pytest.raises(WireError, match=match):
        encoded_size(msg)


def test_oversized_header_rejected_consistently(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "_MAX_HEADER_BYTES", 64)
    msg = Message({"a": torch.ones(1)}, {"note": "x" * 100})
    with pytest.raises(WireError, match="header would be"):
        encoded_size(msg)
    with pytest.raises(WireError, match="header would be"):
        encode(msg)


def test_decode_accepts_and_rejects_exactly_what_safetensors_does(payload: tuple[bytes, dict]) -> None:
    # decode reads through safetensors, then reads the accepted header's metadata itself: every single-byte
    # change of the header must be accepted or rejected as safetensors' own reader does, with the same tensors.
    data, _ = payload
    n = struct.unpack("<Q", data[:8])[0]
    rng = random.Random(3)
    accepted = rejected = 0
    for pos in range(8 + n):
        for new in (data[pos] ^ 0xFF, rng.randrange(256), ord("0"), ord("9"), ord(" ")):
            bad = data[:pos] + bytes([new]) + data[pos + 1 :]
            try:
                reference = safetensors.torch.load(bad)
                json.loads(json.loads(bad[8 : 8 + n])["__metadata__"]["fedtune"])
            except Exception:
                reference = None
            try:
                out = decode(bad).tensors
            except WireError:
                out = None
            assert (out is None) == (reference is None), (pos, new)
            if out is not None:
                accepted += 1
                _assert_same_tensors(reference, out)
            else:
                rejected += 1
    assert accepted and rejected


def test_decode_of_an_unaligned_tensor_gives_it_an_aligned_copy() -> None:
    # A peer may lay a float32 tensor at an odd offset (safetensors' writer never does): still read right.
    x = torch.tensor([1.5, -2.0, 3.25])
    header = {"__metadata__": {"fedtune": "{}"}, "b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "x": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    data = struct.pack("<Q", len(head)) + head + bytes([7]) + x.numpy().tobytes()
    out = decode(data, expect={"b": ((1,), torch.uint8), "x": ((3,), torch.float32)})
    assert torch.equal(out.tensors["x"], x) and out.tensors["b"].item() == 7
    assert out.tensors["x"].data_ptr() % 4 == 0
    out.tensors["x"].add_(1.0)  # writable
    assert torch.equal(safetensors.torch.load(data)["x"], x)


def test_decode_reads_through_safetensors_and_returns_tensors_that_own_their_memory(
    monkeypatch: pytest.MonkeyPatch, payload: tuple[bytes, dict]
) -> None:
    # One parser of hostile input: safetensors' own. Its tensors are copies, never views of the payload.
    data, expect = payload
    calls = []
    real_load = safetensors.torch.load
    monkeypatch.setattr(safetensors.torch, "load", lambda raw: calls.append(len(raw)) or real_load(raw))
    out = decode(memoryview(data), expect=expect)
    assert calls == [len(data)]
    head = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    _assert_same_tensors(real_load(data), out.tensors)
    for t in out.tensors.values():
        assert not head.data_ptr() <= t.data_ptr() < head.data_ptr() + len(data)
        t.zero_()  # writable
    assert decode(data, expect=expect).tensors["a"].abs().sum() > 0  # the payload itself is untouched
    with pytest.raises(TypeError):
        decode(data, copy=False)  # the zero-copy reader is gone (see wire's module docstring)


@pytest.mark.parametrize("ndim", [65, 60000])
def test_decode_refuses_more_than_64_dimensions_that_safetensors_accepts(ndim: int) -> None:
    # Sizes of 1 hold exactly 4 bytes, so safetensors' layout checks pass (and torch builds the tensor).
    header = {"__metadata__": {"fedtune": "{}"}, "x": {"dtype": "F32", "shape": [1] * ndim, "data_offsets": [0, 4]}}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    data = struct.pack("<Q", len(head)) + head + bytes(4)
    assert safetensors.torch.load(data)["x"].ndim == ndim
    with pytest.raises(WireError, match=f"{ndim} dimensions, more than 64"):
        decode(data)
    ok = {"__metadata__": {"fedtune": "{}"}, "x": {"dtype": "F32", "shape": [1] * 64, "data_offsets": [0, 4]}}
    head = json.dumps(ok).encode()
    head += b" " * (-len(head) % 8)
    assert decode(struct.pack("<Q", len(head)) + head + bytes(4)).tensors["x"].ndim == 64


@pytest.mark.parametrize("shape", [[0, 10**30], [0, 2**62, 2**62], [2**40, 2**40], [1] * 65, [2**62] * 60000])
def test_decode_refuses_hostile_shapes_with_a_wire_error_at_once(shape) -> None:
    # Sizes torch cannot build, or whose product (zeros or not) would cost big-integer arithmetic,
    # are refused as malformed: never a TypeError/RuntimeError that takes the receiver down, never slow.
    header = {"__metadata__": {"fedtune": "{}"}, "x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with pytest.raises(WireError, match="not valid safetensors"):
        decode(struct.pack("<Q", len(head)) + head)
    with pytest.raises(Exception) as reference:  # safetensors' own reader refuses them too
        safetensors.torch.load(struct.pack("<Q", len(head)) + head)
    assert reference.value is not None
