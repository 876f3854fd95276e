"""Tests for fedtune.meter.ComputeMeter: FLOPs, peak memory, time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from fedtune import meter as meter_mod
from fedtune.meter import ComputeMeter
from fedtune.models import tiny_llama_config

MiB = 1024**2
CUDA = torch.cuda.is_available()


def _tiny_llama(attn: str, device: str = "cpu") -> transformers.PreTrainedModel:
    # Grouped-query attention like SmolLM2: 4 query heads share 2 key/value heads.
    cfg = tiny_llama_config(vocab_size=256)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(device)


def _llama_train_step_flops(attn: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ComputeMeter:
    model = _tiny_llama(attn, device).to(dtype)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with ComputeMeter(device) as m:
        model(input_ids=ids, labels=ids).loss.backward()
    return m


# --------------------------------------------------------------------------- #
# FLOPs
# --------------------------------------------------------------------------- #


def test_linear_forward_backward_flops_by_hand() -> None:
    m_, k, n = 32, 64, 48
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(m_, k, requires_grad=True)
    with ComputeMeter() as m:
        lin(x).sum().backward()
    # forward x@W^T, backward grad@W (for x) and grad^T@x (for W): 3 matmuls of 2*m*k*n.
    assert m.flops == 3 * 2 * m_ * k * n
    assert m.flops_by_op == {"aten.mm": 3 * 2 * m_ * k * n}


def test_gqa_sdpa_flops_by_hand() -> None:
    b, hq, hkv, sq, sk, d = 2, 6, 2, 10, 12, 8
    q = torch.randn(b, hq, sq, d, requires_grad=True)
    k = torch.randn(b, hkv, sk, d, requires_grad=True)
    v = torch.randn(b, hkv, sk, d, requires_grad=True)
    with ComputeMeter() as m:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True).sum().backward()
    # Key/value heads are broadcast to the hq query heads. Forward: QK^T and PV.
    # Backward: recompute QK^T, dP, dV, dQ, dK. Each is 2*b*hq*sq*sk*d FLOPs.
    unit = 2 * b * hq * sq * sk * d
    assert m.flops == 7 * unit
    if "aten._scaled_dot_product_flash_attention_for_cpu" in m.flops_by_op:
        assert m.flops_by_op["aten._scaled_dot_product_flash_attention_for_cpu"] == 2 * unit
        assert m.flops_by_op["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == 5 * unit


def test_custom_formulas_cover_the_fused_attention_ops() -> None:
    names = {str(op) for op in meter_mod.sdpa_formulas()}
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" in names
    for variant in ("flash", "efficient", "cudnn"):
        assert f"aten._scaled_dot_product_{variant}_attention" in names
        assert f"aten._scaled_dot_product_{variant}_attention_backward" in names


def test_tiny_gqa_llama_sdpa_matches_eager() -> None:
    eager = _llama_train_step_flops("eager")
    sdpa = _llama_train_step_flops("sdpa")
    assert eager.flops > 0 and sdpa.flops > 0
    # Same projections/MLP/head matmuls either way.
    assert sdpa.flops_by_op["aten.mm"] == eager.flops_by_op["aten.mm"]
    # The fused kernel's attention FLOPs are counted, not silently dropped:
    # per layer 2 forward + 5 backward products of 2*b*hq*s*s*d (d = 64/4).
    attention = sum(v for op, v in sdpa.flops_by_op.items() if "scaled_dot_product" in op)
    assert attention == 2 * 7 * (2 * 2 * 4 * 16 * 16 * 16)
    assert abs(sdpa.flops - eager.flops) <= 0.01 * eager.flops


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_gqa_llama_sdpa_matches_eager_cuda(dtype: torch.dtype) -> None:
    # fp32 runs the math kernel (plain bmm); bf16 a fused GQA kernel (cuDNN/flash).
    eager = _llama_train_step_flops("eager", "cuda", dtype)
    sdpa = _llama_train_step_flops("sdpa", "cuda", dtype)
    assert eager.flops > 0 and sdpa.flops > 0
    assert abs(sdpa.flops - eager.flops) <= 0.01 * eager.flops


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"])
def test_gqa_fused_cuda_kernels_flops_by_hand(backend: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, hq, hkv, s, d = 2, 8, 2, 128, 64
    q, k, v = (
        torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (hq, hkv, hkv)
    )
    try:
        with sdpa_kernel([getattr(SDPBackend, backend)]), ComputeMeter("cuda") as m:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    except RuntimeError as exc:  # e.g. the efficient kernel has no dense GQA support
        pytest.skip(f"{backend} cannot run GQA here: {exc}")
    assert m.flops == 7 * (2 * b * hq * s * s * d)
    assert any(backend.split("_")[0].lower() in op for op in m.flops_by_op)


# --------------------------------------------------------------------------- #
# Memory and time
# --------------------------------------------------------------------------- #


def _touch_256_mib(device: str = "cpu") -> None:
    x = torch.ones(64 * MiB, dtype=torch.float32, device=device)  # 256 MiB, every page written
    x += 1
    del x


def _require_resettable_cpu_peak() -> None:
    method = ComputeMeter().memory_method
    if method != meter_mod.MEMORY_METHODS["vmhwm"]:
        pytest.skip(f"CPU peak cannot be reset here: {method}")


def test_cpu_peak_memory_is_per_block() -> None:
    _require_resettable_cpu_peak()
    big, empty = ComputeMeter(count_flops=False), ComputeMeter(count_flops=False)
    # Big block first: if the high-water mark were not reset, the empty block
    # would inherit the big block's peak and the difference would vanish.
    with big:
        _touch_256_mib()
    with empty:
        pass
    assert big.peak_memory_bytes - empty.peak_memory_bytes >= 200 * MiB
    assert big.peak_memory_bytes - big.start_memory_bytes >= 200 * MiB
    assert empty.peak_memory_bytes >= empty.start_memory_bytes > 0
    assert "VmHWM" in big.memory_method


def test_nested_meter_keeps_outer_peak() -> None:
    _require_resettable_cpu_peak()
    lin = torch.nn.Linear(8, 8, bias=False)
    with ComputeMeter() as outer:
        _touch_256_mib()  # outer's peak happens before the inner meter resets the mark
        with ComputeMeter(count_flops=False) as inner:
            lin(torch.randn(4, 8))
        with ComputeMeter() as inner_counting:
            lin(torch.randn(4, 8))
    assert outer.peak_memory_bytes - inner.peak_memory_bytes >= 200 * MiB
    assert inner.flops is None and inner.flops_by_op == {}
    assert inner_counting.flops == 2 * 4 * 8 * 8
    assert outer.flops == 2 * (2 * 4 * 8 * 8)
    assert meter_mod._ACTIVE == []


def test_sequential_reuse_and_time() -> None:
    m = ComputeMeter()
    with pytest.raises(RuntimeError, match="after the `with meter:` block"):
        _ = m.flops
    a = torch.randn(64, 64)
    with m:
        a @ a
    first = (m.flops, m.seconds)
    with m:
        a @ a
        a @ a
    assert first[0] == 2 * 64**3 and m.flops == 2 * first[0]
    assert first[1] > 0 and m.seconds > 0
    with m:
        with pytest.raises(RuntimeError, match="already measuring"):
            m.__enter__()
        with pytest.raises(RuntimeError, match="after the `with meter:` block"):
            _ = m.seconds


def test_block_that_raises_still_records() -> None:
    m = ComputeMeter()
    with pytest.raises(KeyError):
        with m:
            torch.randn(4, 4) @ torch.randn(4, 4)
            raise KeyError("boom")
    assert m.flops == 2 * 4**3 and m.seconds > 0
    assert meter_mod._ACTIVE == []


def test_bad_device_rejected() -> None:
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        ComputeMeter("meta")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            ComputeMeter("cuda")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_peak_memory_is_per_block() -> None:
    big, empty = ComputeMeter("cuda", count_flops=False), ComputeMeter("cuda", count_flops=False)
    with big:
        _touch_256_mib("cuda")
    with empty:
        pass
    assert big.peak_memory_bytes - empty.peak_memory_bytes >= 256 * MiB
    assert big.peak_memory_bytes - big.start_memory_bytes >= 256 * MiB
    assert "cuda" in big.memory_method.lower()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_meter_without_sync_times_the_device_work_and_never_waits() -> None:
    import time

    a = torch.randn(4096, 4096, device="cuda")
    a @ a  # cuBLAS warm-up
    torch.cuda.synchronize()
    meter = ComputeMeter("cuda", count_flops=False, sync=False)
    started = time.perf_counter()
    with meter:
        for _ in range(20):
            a @ a
        extra = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    assert not meter._events[1].query()  # the block returned while its matmuls were still queued
    assert meter.peak_memory_bytes >= meter.start_memory_bytes + extra.numel()  # booked when queued
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    # The events bracket the device's work inside the host's interval: never more than it, never nothing.
    assert 0 < meter.seconds <= wall
    assert meter._events[1].query()
