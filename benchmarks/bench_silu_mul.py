"""silu(gate) * up on the packed projection (kernels/silu_mul.py) against the eager torch expression, bf16,
intermediate 4864: decode batches (8, 256 rows) and a prefill (8000 rows).
Last stdout line: JSON; --quick: CPU smoke run."""
import torch

from common import compare_memory_bound
from omni_fast.kernels.silu_mul import silu_mul, silu_mul_ref


def case(rows):
    def make(device, quick):
        return (torch.randn(4 if quick else rows, 2 * 4864, device=device,
                            dtype=torch.float32 if quick else torch.bfloat16),)
    return f"{rows} x 4864", make, lambda a: a[0].numel() * a[0].element_size() * 3 // 2  # read 2I, write I


def main(argv=None) -> dict:
    return compare_memory_bound("silu_mul", __doc__, [case(8), case(256), case(8000)], silu_mul, silu_mul_ref, argv=argv)


if __name__ == "__main__":
    main()
