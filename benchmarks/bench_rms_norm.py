"""Fused residual add + RMSNorm (kernels/rms_norm.py) against the eager torch expression, bf16, hidden 896:
decode batches (8, 256 rows) and a prefill (8 x 1000 rows). Last stdout line: JSON; --quick: CPU smoke run."""
import torch

from common import compare_memory_bound
from omni_fast.kernels.rms_norm import add_rms_norm, add_rms_norm_ref


def case(rows):
    def make(device, quick):
        dtype = torch.float32 if quick else torch.bfloat16
        n = 4 if quick else rows
        x, r = torch.randn(2, n, 896, device=device, dtype=dtype).unbind(0)
        return x, r, torch.ones(896, device=device, dtype=dtype), 1e-6
    return f"{rows} x 896", make, lambda a: 4 * a[0].numel() * a[0].element_size()  # read x, r; write out, s


def main(argv=None) -> dict:
    return compare_memory_bound("rms_norm", __doc__, [case(8), case(256), case(8000)], add_rms_norm, add_rms_norm_ref, argv=argv)


if __name__ == "__main__":
    main()
