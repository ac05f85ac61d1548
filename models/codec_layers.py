"""Layers of the learned image codecs (CompressAI's ``layers``): GDN and the 5x5 stride-2 convolutions.

Pure PyTorch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LowerBound(torch.autograd.Function):
    """max(x, bound) whose gradient still flows when it pushes x up (Ballé's trick)."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (grad < 0)
        return grad * pass_through, None


class GDN(nn.Module):
    """Generalised divisive normalisation: ``y_i = x_i / sqrt(β_i + Σ_j γ_ij x_j²)``.

    ``inverse=True`` multiplies instead (IGDN, used in the synthesis transform).
    β and γ are reparametrised to stay positive.
    """

    def __init__(self, channels: int, inverse: bool = False, beta_min: float = 1e-6, gamma_init: float = 0.1) -> None:
        super().__init__()
        self.inverse = inverse
        self._pedestal = 2.0**-18
        self._beta_bound = math.sqrt(beta_min + self._pedestal)
        self._gamma_bound = math.sqrt(self._pedestal)
        self.beta = nn.Parameter(torch.sqrt(torch.ones(channels) + self._pedestal))
        self.gamma = nn.Parameter(torch.sqrt(gamma_init * torch.eye(channels) + self._pedestal))

    def forward(self, x: Tensor) -> Tensor:
        beta = LowerBound.apply(self.beta, self._beta_bound) ** 2 - self._pedestal
        gamma = LowerBound.apply(self.gamma, self._gamma_bound) ** 2 - self._pedestal
        c = x.shape[1]
        norm = F.conv2d(x * x, gamma.view(c, c, 1, 1), beta)
        return x * torch.sqrt(norm) if self.inverse else x * torch.rsqrt(norm)


def conv(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> nn.Conv2d:
    """A ``kernel x kernel`` convolution that divides the resolution by ``stride`` ("same" padding)."""
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


def deconv(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    """A transposed convolution that multiplies the resolution by ``stride`` exactly."""
    return nn.ConvTranspose2d(cin, cout, kernel, stride=stride, padding=kernel // 2, output_padding=stride - 1)


def analysis_transform(cin: int, n: int, m: int) -> nn.Sequential:
    """``g_a``: four stride-2 5x5 convolutions with GDN between them (image -> latent at 1/16)."""
    return nn.Sequential(conv(cin, n), GDN(n), conv(n, n), GDN(n), conv(n, n), GDN(n), conv(n, m))


def synthesis_transform(m: int, n: int, cout: int) -> nn.Sequential:
    """``g_s``: the mirror of :func:`analysis_transform` with inverse GDN (latent -> image)."""
    return nn.Sequential(
        deconv(m, n), GDN(n, inverse=True), deconv(n, n), GDN(n, inverse=True),
        deconv(n, n), GDN(n, inverse=True), deconv(n, cout),
    )


class IntegerConvStack(nn.Module):
    """Exact integer evaluation of a stack of (transposed) convolutions with ReLU between them.

    Built from a trained float stack (:meth:`quantise_from`), it computes the same function
    in fixed point (Ballé, Johnston & Minnen, "Integer networks for data compression with
    latent-variable models", ICLR 2019): activations carry ``act_bits`` fractional bits,
    each output channel's weights are integers of at most ``weight_bits`` bits (the channel's
    own power-of-two scale) and biases integers at the accumulator's scale. Every value stays
    an integer below 2**53 in magnitude (clamps bound the activations), so float64
    convolutions compute them exactly, whatever the summation order or the number of
    threads: the result is the same on every machine. Rescaling between layers divides by
    powers of two and floors, which is exact too.

    Args:
        specs: ``(transposed, in_channels, out_channels, kernel, stride)`` per layer, as in the float stack.
        act_bits: Fractional bits of the activations (inputs and outputs are integers at this scale).
        weight_bits: Magnitude bits of each channel's largest weight.
    """

    ACT_LIMIT = 2.0**22
    MAX_TERMS = 2**18
    MAX_SHIFT = 30
    BIAS_LIMIT = 2.0**48

    def __init__(self, specs: list[tuple[bool, int, int, int, int]], act_bits: int = 10, weight_bits: int = 12) -> None:
        super().__init__()
        self.specs = [tuple(s) for s in specs]
        self.act_bits, self.weight_bits = int(act_bits), int(weight_bits)
        for transposed, cin, cout, kernel, stride in self.specs:
            if cin * kernel * kernel > self.MAX_TERMS or not 1 <= self.weight_bits <= 15:
                raise ValueError(f"layer {cin}->{cout} (kernel {kernel}) or weight_bits {weight_bits} "
                                 "exceeds the exact float64 range")
        for i in range(len(self.specs)):
            self.register_buffer(f"weight{i}", torch.zeros(0, dtype=torch.int16))
            self.register_buffer(f"shift{i}", torch.zeros(0, dtype=torch.int32))
            self.register_buffer(f"bias{i}", torch.zeros(0, dtype=torch.int64))

    @property
    def ready(self) -> bool:
        return all(getattr(self, f"weight{i}").numel() > 0 for i in range(len(self.specs)))

    @torch.no_grad()
    def quantise_from(self, layers: list[nn.Module]) -> None:
        """Fixed-point copies of the float layers' weights and biases (deterministic: IEEE operations only)."""
        if len(layers) != len(self.specs):
            raise ValueError(f"expected {len(self.specs)} layers, got {len(layers)}")
        for i, (layer, (transposed, _, cout, _, _)) in enumerate(zip(layers, self.specs, strict=True)):
            w = layer.weight.detach().double().cpu()
            out_dim = 1 if transposed else 0
            per_out = w.transpose(0, out_dim).reshape(cout, -1).abs().amax(1)
            _, exp = torch.frexp(per_out.clamp_min(2.0**-40))  # max = m·2^exp, m in [0.5, 1)
            shift = (self.weight_bits - exp).clamp(0, self.MAX_SHIFT)
            view = [1] * w.dim()
            view[out_dim] = cout
            w_int = torch.round(w * _pow2(shift).view(view))
            limit = 2.0**self.weight_bits - 1
            w_int = w_int.clamp(-limit, limit)
            b = layer.bias.detach().double().cpu()
            b_int = torch.round(b * _pow2(shift + self.act_bits)).clamp(-self.BIAS_LIMIT, self.BIAS_LIMIT)
            setattr(self, f"weight{i}", w_int.to(torch.int16))
            setattr(self, f"shift{i}", shift.to(torch.int32))
            setattr(self, f"bias{i}", b_int.to(torch.int64))

    @torch.no_grad()
    def forward(self, a: Tensor, device: str | torch.device = "cpu") -> Tensor:
        """Integer-valued float64 activations (N, C, H, W) at ``act_bits`` -> the stack's output, same scale.

        Runs on the CPU by default, where float64 convolutions are plain multiply-adds (the
        codec always decodes this way); ``device`` is for checking another device's results.
        """
        a = a.detach().to(device, torch.float64).clamp(-self.ACT_LIMIT, self.ACT_LIMIT)
        last = len(self.specs) - 1
        for i, (transposed, _, _, kernel, stride) in enumerate(self.specs):
            w = getattr(self, f"weight{i}").to(device, torch.float64)
            if transposed:
                acc = F.conv_transpose2d(a, w, stride=stride, padding=kernel // 2, output_padding=stride - 1)
            else:
                acc = F.conv2d(a, w, stride=stride, padding=kernel // 2)
            acc = acc + getattr(self, f"bias{i}").to(device, torch.float64).view(1, -1, 1, 1)
            a = torch.floor(acc * _pow2(-getattr(self, f"shift{i}").cpu()).to(device).view(1, -1, 1, 1))
            a = a.clamp(-self.ACT_LIMIT, self.ACT_LIMIT) if i == last else a.clamp(0.0, self.ACT_LIMIT)
        return a


def _pow2(exponents: Tensor) -> Tensor:
    """Exact float64 powers of two, ``2**e`` per integer ``e`` (``math.ldexp``: no ``pow`` rounding)."""
    return torch.tensor([math.ldexp(1.0, int(e)) for e in exponents.reshape(-1).tolist()],
                        dtype=torch.float64).view(exponents.shape)
