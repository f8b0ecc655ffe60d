"""Cascade (shared-prefix) decode attention over a paged KV pool: the reference against per-row attention, the
Triton kernel against the reference in fp64 with the 2x-torch-error rule (CPU interpreter here, the GPU in the
gpu class), the CPU path against per-row fp64 attention. Block tables are scattered over the pool (a random
permutation of block ids), or one consecutive run where the CPU path reads a view."""
import pytest
import torch
import torch.nn.functional as F

from omni_fast import ops
from omni_fast.kernels.cascade_attention import cascade_attention_ref

HQ, HKV, D = 14, 2, 64


def _case(prefix_lens, group_size, dtype, device="cpu", gen_cap=70, seed=0, block_size=16, consecutive=False):
    """(q, k_cache, v_cache, prefix_tables, prefix_lens, groups, gen_tables, gen_lens): P prompts with
    `group_size` rows each, 3 spare blocks in the pool, tables int32 with entries past each sequence pointing
    anywhere in the pool."""
    g = torch.Generator().manual_seed(seed)
    p = len(prefix_lens)
    b = p * group_size
    wp, wg = -(-(max(prefix_lens) + 5) // block_size), -(-gen_cap // block_size)
    n_blocks = p * wp + b * wg + 3
    k_cache, v_cache = torch.randn(2, n_blocks, block_size, HKV, D, generator=g).unbind(0)
    ids = torch.arange(n_blocks) if consecutive else torch.randperm(n_blocks, generator=g)
    prefix_tables = ids[: p * wp].view(p, wp).int()
    gen_tables = ids[p * wp: p * wp + b * wg].view(b, wg).int()
    q = torch.randn(b, HQ, D, generator=g)
    groups = torch.arange(p).repeat_interleave(group_size)
    gen_lens = torch.randint(1, gen_cap + 1, (b,), generator=g)
    gen_lens[0] = 1
    lens = torch.tensor(prefix_lens)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k_cache.to(dtype=dtype, **to), v_cache.to(dtype=dtype, **to),
            prefix_tables.to(**to), lens.to(**to), groups.to(**to), gen_tables.to(**to), gen_lens.to(**to))


def _sequence(cache, table, length):
    """The first `length` positions of a paged sequence, (length, Hkv, D)."""
    return cache[table.long()].reshape(-1, HKV, D)[:length]


def _fp64(args):
    return [a.double() if a.is_floating_point() else a for a in args]


class TestReferencePath:
    @pytest.mark.parametrize("prefix_lens,group_size", [((1,), 1), ((37, 5), 3), ((1000,), 8), ((13, 1, 64), 2)])
    def test_is_attention_over_the_prefix_then_the_rows_own_tokens(self, prefix_lens, group_size):
        q, kc, vc, pt, lens, groups, gt, gen_lens = _fp64(_case(prefix_lens, group_size, torch.float32))
        out = cascade_attention_ref(q, kc, vc, pt, lens, groups, gt, gen_lens)
        rep = HQ // HKV
        for r in range(q.shape[0]):
            g = groups[r]
            k = torch.cat([_sequence(kc, pt[g], lens[g]), _sequence(kc, gt[r], gen_lens[r])]).repeat_interleave(rep, 1)
            v = torch.cat([_sequence(vc, pt[g], lens[g]), _sequence(vc, gt[r], gen_lens[r])]).repeat_interleave(rep, 1)
            ref = F.scaled_dot_product_attention(q[r][:, None], k.transpose(0, 1), v.transpose(0, 1))[:, 0]
            assert (out[r] - ref).abs().max() < 1e-10


def _check_against_fp64(args, dtype):
    out = ops.cascade_attention(*args)
    ref = cascade_attention_ref(*_fp64(args))
    torch_err = (cascade_attention_ref(*args, compute_dtype=dtype).double() - ref).abs().max()
    err = (out.double() - ref).abs().max()
    assert out.dtype == dtype and out.shape == args[0].shape
    assert err <= 2 * torch_err, (err, torch_err)


class TestTritonInterpreter:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("prefix_lens,group_size", [((1,), 1), ((37,), 3), ((1000,), 8), ((37, 1, 100), 3)])
    def test_matches_reference(self, prefix_lens, group_size, dtype):
        with ops.force_backend("triton", "cascade_attention"):
            _check_against_fp64(_case(prefix_lens, group_size, dtype), dtype)

    def test_uneven_groups_and_an_empty_group(self):
        """Rows sorted by group, group 1 with no rows this step (all its samples finished)."""
        q, kc, vc, pt, lens, _, gt, gen_lens = _case((20, 30, 40), 2, torch.float32)
        groups = torch.tensor([0, 0, 0, 2, 2, 2])
        with ops.force_backend("triton", "cascade_attention"):
            _check_against_fp64((q, kc, vc, pt, lens, groups, gt, gen_lens), torch.float32)

    @pytest.mark.parametrize("block_size", [1, 4, 64, 128])
    def test_block_sizes(self, block_size):
        """Blocks smaller than, equal to and larger than the kernel's 64-key tile."""
        with ops.force_backend("triton", "cascade_attention"):
            _check_against_fp64(_case((100, 7), 3, torch.float32, block_size=block_size), torch.float32)

    def test_split_count_does_not_change_the_result(self):
        from omni_fast.kernels.cascade_attention import cascade_attention

        args = _case((300,), 4, torch.float32)
        outs = [cascade_attention(*args, splits=s) for s in (1, 3, 16)]
        assert all((o - outs[0]).abs().max() < 1e-5 for o in outs)


@pytest.mark.gpu
class TestComparePathsGPU:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize("prefix_lens,group_size", [((1,), 1), ((37,), 3), ((1000,), 8), ((1000,) * 8, 8),
                                                        ((900, 1100, 37), 16)])
    def test_matches_reference(self, prefix_lens, group_size, dtype):
        args = _case(prefix_lens, group_size, dtype, device="cuda", gen_cap=600)
        _check_against_fp64(args, dtype)


def _per_row_fp64(q, kc, vc, pt, lens, groups, gt, gen_lens):
    """Plain fp64 softmax attention, one row at a time (no online softmax, no merge)."""
    q, kc, vc = (x.double() for x in (q, kc, vc))
    rep, scale = HQ // HKV, D ** -0.5
    out = torch.empty_like(q)
    for r in range(q.shape[0]):
        g = groups[r]
        k = torch.cat([_sequence(kc, pt[g], lens[g]), _sequence(kc, gt[r], gen_lens[r])]).repeat_interleave(rep, 1)
        v = torch.cat([_sequence(vc, pt[g], lens[g]), _sequence(vc, gt[r], gen_lens[r])]).repeat_interleave(rep, 1)
        scores = torch.einsum("hd,thd->ht", q[r], k) * scale
        out[r] = torch.einsum("ht,thd->hd", torch.softmax(scores, dim=-1), v)
    return out


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("prefix_lens,group_size", [((37,), 3), ((300, 5), 2)])
def test_large_logits_stay_finite_and_exact(backend, prefix_lens, group_size):
    """Scores far above 88 (exp overflows fp32 there): every softmax and the log-sum-exp merge of the prefix
    splits with the generated part must subtract their maximum, or the output is inf/nan."""
    q, kc, vc, pt, lens, groups, gt, gen_lens = _case(prefix_lens, group_size, torch.float32)
    q = q * 40                                                                      # logits ~ N(0, 40^2)
    args = (q, kc, vc, pt, lens, groups, gt, gen_lens)
    ref = _per_row_fp64(*args)
    assert (torch.einsum("bhd,nthd->bhnt", q.double()[:, ::HQ // HKV], kc.double()) * D ** -0.5).max() > 100
    with ops.force_backend(backend, "cascade_attention"):
        out = ops.cascade_attention(*args)
    assert torch.isfinite(out).all()
    torch_err = (cascade_attention_ref(*args, compute_dtype=torch.float32).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * max(torch_err, 4 * torch.finfo(torch.float32).eps * ref.abs().max().item()), (err, torch_err)


def _ragged_case(sizes, prefix_lens, dtype=torch.float32, seed=1, consecutive=False):
    """Groups of different sizes (0 = a group with no rows this step), rows sorted by group, a pad group with
    prefix length 0 at the end (the engine's graph layout, model_runner.py), gen_lens from 1 to the capacity."""
    q, kc, vc, pt, lens, _, gt, gen_lens = _case(tuple(prefix_lens) + (0,), max(sizes), dtype, seed=seed,
                                                  consecutive=consecutive)
    groups = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    b = groups.numel()
    gen_lens = gen_lens[:b].clone()
    gen_lens[-1] = gt.shape[1] * kc.shape[1]
    return q[:b], kc, vc, pt, lens, groups, gt[:b], gen_lens


CPU_CASES = [((1,), 1), ((37, 5), 3), ((1000,), 8), ((13, 1, 64), 2)]
RAGGED = [((3, 0, 1, 5), (20, 30, 1, 64)), ((1, 7), (1, 100)), ((16,), (1000,))]


class TestCPUPath:
    """cascade_attention_cpu, the CPU dispatch of ops.cascade_attention: fp64 inputs give the per-row fp64
    attention to 1e-10 (a key too many or too few, or another group's prefix, moves it by far more), fp32 /
    bf16 inputs stay within 2x torch's own error."""

    def test_is_the_cpu_dispatch(self):
        from omni_fast.kernels.cascade_attention import cascade_attention_cpu

        assert ops.backends("cascade_attention", "cpu") == ["cpu", "torch"]
        assert ops._pick("cascade_attention", torch.device("cpu"), torch.zeros(1)) is cascade_attention_cpu

    @pytest.mark.parametrize("consecutive", [False, True])
    @pytest.mark.parametrize("prefix_lens,group_size", CPU_CASES)
    def test_fp64_equals_per_row_attention(self, prefix_lens, group_size, consecutive):
        """Scattered blocks (a gather) and one consecutive run (a view of the pool) alike."""
        args = _fp64(_case(prefix_lens, group_size, torch.float32, consecutive=consecutive))
        out = ops.cascade_attention(*args)
        assert out.dtype == torch.float64
        assert (out - _per_row_fp64(*args)).abs().max() < 1e-10

    @pytest.mark.parametrize("consecutive", [False, True])
    @pytest.mark.parametrize("sizes,prefix_lens", RAGGED)
    def test_ragged_groups_fp64(self, sizes, prefix_lens, consecutive):
        args = _fp64(_ragged_case(sizes, prefix_lens, consecutive=consecutive))
        groups = args[5]
        counts = torch.bincount(groups, minlength=len(prefix_lens) + 1)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (P + 1,) as the engine's searchsorted
        ref = _per_row_fp64(*args)
        for given in (None, offsets):
            assert (ops.cascade_attention(*args, group_offsets=given) - ref).abs().max() < 1e-10

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("prefix_lens,group_size", CPU_CASES)
    def test_low_precision_within_torch_error(self, prefix_lens, group_size, dtype):
        _check_against_fp64(_case(prefix_lens, group_size, dtype), dtype)

    @pytest.mark.parametrize("sizes,prefix_lens", RAGGED)
    def test_ragged_groups_fp32(self, sizes, prefix_lens):
        _check_against_fp64(_ragged_case(sizes, prefix_lens), torch.float32)

    @pytest.mark.parametrize("sizes,prefix_lens", RAGGED)
    def test_matmul_fallback(self, monkeypatch, sizes, prefix_lens):
        """Where torch lacks its fused CPU attention kernel the matmul form runs: the same results, large
        scores included."""
        from omni_fast.kernels import cascade_attention as kernel

        monkeypatch.setattr(kernel, "_FLASH_CPU", None)
        args = _fp64(_ragged_case(sizes, prefix_lens))
        assert (kernel.cascade_attention_cpu(*args) - _per_row_fp64(*args)).abs().max() < 1e-10
        q, *rest = _ragged_case(sizes, prefix_lens)
        args = (q * 40, *rest)
        out = kernel.cascade_attention_cpu(*args)
        assert torch.isfinite(out).all()
        assert (out.double() - _per_row_fp64(*args)).abs().max() < 1e-3

    def test_pad_rows_read_only_their_own_keys(self):
        """A row of the pad group (prefix length 0) attends to its generated keys alone."""
        q, kc, vc, pt, lens, groups, gt, gen_lens = _fp64(_ragged_case((2, 0), (50, 10)))
        groups = torch.tensor([0, 2])  # row 1 in the pad group
        args = (q, kc, vc, pt, lens, groups, gt, gen_lens)
        assert (ops.cascade_attention(*args) - _per_row_fp64(*args)).abs().max() < 1e-10


def _poison_past_ends(kc, vc, pt, lens, gt, gen_lens, value):
    """Copies of the pool and tables where every position past a sequence's end - the tail of its last block,
    the blocks no sequence owns, which table entries past each end now point to - holds `value`."""
    bs = kc.shape[1]
    kc, vc, pt, gt = kc.clone(), vc.clone(), pt.clone(), gt.clone()
    owned = set()
    for table, length in [(pt[g], int(lens[g])) for g in range(pt.shape[0])] + [
            (gt[r], int(gen_lens[r])) for r in range(gt.shape[0])]:
        n = -(-length // bs)
        owned.update(table[:n].tolist())
        if length % bs:
            kc[table[n - 1], length % bs:] = value
            vc[table[n - 1], length % bs:] = value
    stray = sorted(set(range(kc.shape[0])) - owned)
    kc[stray], vc[stray] = value, value
    for tables, lengths in ((pt, lens), (gt, gen_lens)):
        for i in range(tables.shape[0]):
            tables[i, -(-int(lengths[i]) // bs):] = stray[i % len(stray)]
    return kc, vc, pt, gt


@pytest.mark.parametrize("backend,value", [("cpu", 1e4), ("torch", 1e4), ("triton", 1e4), ("triton", float("nan"))])
def test_reads_nothing_past_a_sequence_end(backend, value):
    """Keys and values past each sequence's end (its last block's tail, unowned blocks, stale table entries)
    set to a huge value change nothing: a key too many would dominate the softmax. The Triton kernel never
    loads them at all (NaN there too); the CPU and torch paths gather whole blocks and mask, which needs those
    positions finite (the engine's pool is zeroed on first use and only ever holds keys and values)."""
    q, kc, vc, pt, lens, groups, gt, gen_lens = _case((37, 5), 3, torch.float32, block_size=4)
    expected = _per_row_fp64(q, kc, vc, pt, lens, groups, gt, gen_lens)
    kc, vc, pt, gt = _poison_past_ends(kc, vc, pt, lens, gt, gen_lens, value)
    with ops.force_backend(backend, "cascade_attention"):
        out = ops.cascade_attention(q, kc, vc, pt, lens, groups, gt, gen_lens)
    assert (out.double() - expected).abs().max() < 1e-4
