"""`python -m benchmarks.strided_conv`: DCGAN's second discriminator convolution at model.d_width 64 (4x4, stride 2,
64 to 128 channels, 14x14 to 7x7, batch 128), the largest share of a full-width step on the CPU, timed forward and
backward in bf16 autocast in the forms that compute the same function: direct, as a 2x2 stride-1 convolution on
pixel_unshuffle of the padded input, as unfold and a matrix product, and in channels_last. Prints ms per
forward+backward, the mean of 20 after 20, and the direct form's FLOP/s forward and forward+backward beside a large
bf16 matrix product's in the same run: how near the machine's limit the step's largest operator already runs."""

import time

import torch
import torch.nn.functional as F

from benchmarks.bench import matmul_flops_per_second

BATCH, IN_CHANNELS, OUT_CHANNELS, SIZE = 128, 64, 128, 14
# Multiply-adds of one forward: every output value (batch x out channels x 7 x 7) sums in channels x 4 x 4 products.
FORWARD_FLOP = 2 * BATCH * OUT_CHANNELS * (SIZE // 2) ** 2 * IN_CHANNELS * 4 * 4


def space_to_depth(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    o, c = w.shape[:2]
    packed = F.pixel_unshuffle(F.pad(x, (1, 1, 1, 1)), 2)  # [n, 4c, (h+2)/2, (w+2)/2]
    return F.conv2d(packed, w.view(o, c, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(o, 4 * c, 2, 2))


def unfold_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    columns = F.unfold(x, 4, padding=1, stride=2)  # [n, 16c, h/2 * w/2]
    return (w.flatten(1) @ columns).view(len(x), w.shape[0], x.shape[2] // 2, x.shape[3] // 2)


def channels_last(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.contiguous(memory_format=torch.channels_last),
                    w.contiguous(memory_format=torch.channels_last), stride=2, padding=1)


def main() -> None:
    x = torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE, requires_grad=True)
    w = torch.randn(OUT_CHANNELS, IN_CHANNELS, 4, 4, requires_grad=True)
    direct = F.conv2d(x, w, stride=2, padding=1)
    forms = {"direct": lambda: F.conv2d(x, w, stride=2, padding=1), "space_to_depth": lambda: space_to_depth(x, w),
             "unfold_matmul": lambda: unfold_matmul(x, w), "channels_last": lambda: channels_last(x, w)}
    with_backward = {}
    for name, form in forms.items():
        difference = (form() - direct).abs().max().item()  # fp32: the same function up to rounding
        with_backward[name] = timed(form, backward=True)
        print(f"{name}: {with_backward[name] * 1000:.1f} ms (fp32 difference {difference:.1e})")
    forward, both = timed(forms["direct"], backward=False), with_backward["direct"]
    peak = matmul_flops_per_second(torch.device("cpu"), "bf16")
    # The backward computes the input's and the weight's gradients: two more products of the forward's size.
    for name, seconds, flop in (("forward", forward, FORWARD_FLOP), ("forward+backward", both, 3 * FORWARD_FLOP)):
        print(f"direct {name}: {seconds * 1000:.1f} ms, {flop / seconds / 1e9:.0f} GFLOP/s, "
              f"{100 * flop / seconds / peak:.0f}% of a bf16 matrix product's {peak / 1e9:.0f} GFLOP/s")


def timed(form, backward: bool, repeats: int = 20) -> float:
    """Seconds per forward of `form` in bf16 autocast (and its backward), the mean of `repeats` after as many."""
    for _ in range(2):
        started = time.perf_counter()
        for _ in range(repeats):
            with torch.autocast("cpu", torch.bfloat16):
                y = form()
            if backward:
                y.float().square().mean().backward()
    return (time.perf_counter() - started) / repeats


if __name__ == "__main__":
    main()
