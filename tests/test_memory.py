"""release_memory gives freed heap memory back to the OS; rss_mb reads it."""

from __future__ import annotations

import gc

import pytest
import torch

from rlhfkit.accel import memory, optim
from rlhfkit.accel.memory import release_memory, rss_mb


@pytest.mark.skipif(memory._LIBC is None, reason="malloc_trim is glibc's; this C library has none")
def test_release_memory_returns_freed_heap_pages():
    # 100 KB tensors come from the heap (below glibc's mmap threshold); keeping every other one
    # alive leaves the freed ones as holes that glibc keeps resident until malloc_trim
    keep, free = [], []
    for i in range(4000):
        (keep if i % 2 else free).append(torch.ones(25_000))
    del free
    gc.collect()
    held, peak = rss_mb()
    assert 0 < held <= peak
    release_memory()
    after, _ = rss_mb()
    assert held - after > 100, (held, after)  # ~200 MB were freed; at least half goes back at once
    assert all(float(t[0]) == 1.0 for t in keep[:10])  # live tensors are untouched


@pytest.mark.skipif(memory._LIBC is None, reason="mallopt is glibc's; this C library has none")
def test_reuse_freed_memory_serves_a_big_tensor_again_without_page_faults():
    import resource

    assert memory.reuse_freed_memory()

    def faults_of_one_allocation() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(30_000_000)  # 120 MB: above glibc's largest mmap threshold
        t.fill_(1.0)  # touch every page
        after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assert float(t[-1]) == 1.0
        del t
        return after - before

    faults_of_one_allocation()  # the first ones fault their pages in (the heap grows to fit)
    faults_of_one_allocation()
    again = sorted(faults_of_one_allocation() for _ in range(5))
    # glibc's default unmaps the block on free: every allocation would fault all ~29,000 4 KB
    # pages again (~60 with 2 MB huge pages). Kept in the heap, the block is reused; a small
    # allocation landing in front of it can still push one re-allocation past the heap's end
    assert again[2] < 50, again


def test_reuse_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("RLHFKIT_MALLOC", "default")
    assert memory.reuse_freed_memory() is False


def test_own_memory_takes_parameters_out_of_the_checkpoint_file_mapping(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(tmp_path / "m.safetensors"))
    loaded = load_file(str(tmp_path / "m.safetensors"))["w"]  # zero-copy: a view of the mapped file
    p = torch.nn.Parameter(loaded)
    tied = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2, bias=False), "b": torch.nn.Linear(3, 2, bias=False)})
    tied.a.weight = p
    tied.b.weight = p  # tied weights are one Parameter object
    before = p.data_ptr()
    optim.own_memory([p])
    assert p.data_ptr() != before
    assert torch.equal(p.detach(), torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert tied.a.weight is tied.b.weight is p
    with torch.no_grad():
        p.add_(1.0)  # writing it leaves the file alone
    assert torch.equal(
        load_file(str(tmp_path / "m.safetensors"))["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3)
    )


def test_allocated_adamw_state_gives_the_same_steps_and_state_as_lazy_state():
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 2)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    runs = []
    for eager in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        frozen = torch.nn.Parameter(torch.ones(3))  # in the optimizer, never gets a gradient
        opt = torch.optim.AdamW(
            [{"params": params + [frozen], "lr": 1e-2}], weight_decay=0.1, betas=(0.9, 0.95), fused=True
        )
        if eager:
            optim.allocate_adamw_state(opt)
            assert opt.state[params[0]]["exp_avg"].shape == shapes[0]
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert torch.equal(frozen.detach(), torch.ones(3))
        runs.append((params, opt))
    (lazy, lazy_opt), (eager, eager_opt) = runs
    for a, b in zip(lazy, eager):
        assert torch.equal(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            sa, sb = lazy_opt.state[a][key], eager_opt.state[b][key]
            assert sa.dtype == sb.dtype and sa.device == sb.device and torch.equal(sa, sb), key
    # a resumed run loads the saved state over the allocated one
    fresh = [torch.nn.Parameter(t.clone()) for t in init] + [torch.nn.Parameter(torch.ones(3))]
    again = torch.optim.AdamW([{"params": fresh, "lr": 1e-2}], weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    optim.allocate_adamw_state(again)
    again.load_state_dict(eager_opt.state_dict())
    assert torch.equal(again.state[fresh[0]]["exp_avg"], eager_opt.state[eager[0]]["exp_avg"])
    assert float(again.state[fresh[0]]["step"]) == 3.0


@pytest.mark.parametrize("max_norm", [0.05, 100.0, 0.0], ids=["clipped", "below-the-norm", "no-clipping"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "foreach-adamw"])
def test_clip_and_step_is_clip_grad_norm_then_step(max_norm, fused):
    """clip_and_step (norm from dot products, clip factor as fused AdamW's grad_scale) gives the
    parameters, optimizer state and pre-clip norm of clip_grad_norm_ + step, over three steps."""
    from rlhfkit.accel.optim import clip_and_step

    def run(ours: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
        model[1].weight.requires_grad_(False)  # a frozen parameter has no gradient
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused, foreach=None if fused else True)
        norms = []
        for step in range(3):
            x = torch.randint(0, 50, (6, 4), generator=torch.Generator().manual_seed(step))
            model(x).square().mean().mul(10.0).backward()
            if ours:
                norms.append(clip_and_step(opt, params, max_norm))
            else:
                norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else None)
                opt.step()
            opt.zero_grad(set_to_none=True)
        assert not hasattr(opt, "grad_scale")  # nothing left behind for the next step
        return params, opt, norms

    (p_ours, o_ours, n_ours), (p_ref, o_ref, n_ref) = run(True), run(False)
    for a, b in zip(p_ours, p_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(o_ours.state[a][key], o_ref.state[b][key], rtol=1e-5, atol=1e-9)
    if max_norm > 0:
        assert torch.allclose(torch.stack(n_ours), torch.stack(n_ref), rtol=1e-5)
        clipped = [float(n) > max_norm for n in n_ref]
        assert all(clipped) if max_norm < 1 else not any(clipped)  # both branches really ran
    else:
        assert n_ours == n_ref == [None] * 3
