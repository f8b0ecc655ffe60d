"""Rotary embedding of q and k in one launch (kernels/rope.py) against the eager torch expression, bf16,
14 query / 2 KV heads of 64: decode batches (8, 256 tokens) and a prefill (8000 tokens).
Last stdout line: JSON; --quick: CPU smoke run."""
import torch

from common import compare_memory_bound
from omni_fast.kernels.rope import rope, rope_ref


def case(tokens):
    def make(device, quick):
        dtype = torch.float32 if quick else torch.bfloat16
        n = 4 if quick else tokens
        qkv = torch.randn(n, 18 * 64, device=device, dtype=dtype)
        q, k, _ = qkv.split([14 * 64, 2 * 64, 2 * 64], dim=-1)
        cos, sin = torch.randn(2, n, 64, device=device, dtype=dtype).unbind(0)
        return q.view(n, 14, 64), k.view(n, 2, 64), cos, sin
    return f"{tokens} tokens", make, lambda a: 2 * (a[0].numel() + a[1].numel()) * a[0].element_size()


def main(argv=None) -> dict:
    return compare_memory_bound("rope", __doc__, [case(8), case(256), case(8000)], rope, rope_ref, argv=argv)


if __name__ == "__main__":
    main()
