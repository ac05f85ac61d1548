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


def receptive_halo(specs: list[tuple[bool, int, int]], multiple: int = 1) -> int:
    """How many pixels of a stack's input, on each side, one output pixel can depend on (rounded up
    to ``multiple``): the halo :func:`models.image_ops.map_tiles` needs to give the untiled result.

    ``specs``: ``(transposed, kernel, stride)`` of the (transposed) convolutions in order, with the
    padding of :func:`conv` / :func:`deconv`; whatever lies between them is pointwise (GDN, ReLU).
    A conservative bound: a convolution reaches ``max(p, k - 1 - p)`` pixels of its input, a
    transposed one ``ceil(that / stride) + 1``, each counted in the stack's input pixels.
    """
    halo, pixel = 0.0, 1.0  # pixel: the current layer's input pixel, in the stack's input pixels
    for transposed, kernel, stride in specs:
        p = kernel // 2
        reach = max(p, kernel - 1 - p)
        if transposed:
            halo += (math.ceil(reach / stride) + 1) * pixel
            pixel /= stride
        else:
            halo += reach * pixel
            pixel *= stride
    return math.ceil(math.ceil(halo) / multiple) * multiple


def conv_specs(stack: nn.Module) -> list[tuple[bool, int, int]]:
    """``(transposed, kernel, stride)`` of a float stack's (transposed) convolutions, for :func:`receptive_halo`."""
    return [(isinstance(m, nn.ConvTranspose2d), m.kernel_size[0], m.stride[0])
            for m in stack.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


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
    """Exact integer evaluation of a stack of (transposed) convolutions with ReLU or inverse GDN between them.

    Built from a trained float stack (:meth:`quantise_from`), it computes the same function
    in fixed point (Ballé, Johnston & Minnen, "Integer networks for data compression with
    latent-variable models", ICLR 2019): activations carry ``act_bits`` fractional bits,
    each output channel's weights are integers of at most ``weight_bits`` bits (the channel's
    own power-of-two scale) and biases integers at the accumulator's scale. Every value stays
    an integer below 2**53 in magnitude (clamps bound the activations), so float64
    convolutions compute them exactly, whatever the summation order or the number of
    threads: the result is the same on every machine. Rescaling between layers divides by
    powers of two and floors, which is exact too.

    With ``nonlinearity="igdn"`` (the synthesis transform ``g_s``) the layers between the
    convolutions are inverse GDNs, ``y_i = x_i·sqrt(β_i + Σ_j γ_ij x_j²)``, in the same
    arithmetic: squares floored to the activation scale, γ as integers of ``weight_bits`` bits
    per output channel, β at the accumulator's scale, and the square root as an exact integer
    square root (a float64 ``sqrt`` then corrected by integer comparisons, so even a square root
    that were off by an ulp gives the same result) with ``SQRT_BITS`` fractional bits.

    Args:
        specs: ``(transposed, in_channels, out_channels, kernel, stride)`` per layer, as in the float stack.
        act_bits: Fractional bits of the activations (inputs and outputs are integers at this scale).
        weight_bits: Magnitude bits of each channel's largest weight.
        nonlinearity: ``"relu"`` or ``"igdn"`` between the layers.
        persistent: Whether the integer parameters are saved in the state dict (``False`` when
            they are derived from the float weights on load, as for ``g_s``).
    """

    ACT_LIMIT = 2.0**22
    MAX_TERMS = 2**18
    MAX_SHIFT = 30
    BIAS_LIMIT = 2.0**48
    SQRT_BITS = 16  # fractional bits of the inverse GDN's square root
    NORM_LIMIT = 2.0**45  # bound of the inverse GDN's integer β + Σγx² (exact products below 2**53)

    def __init__(self, specs: list[tuple[bool, int, int, int, int]], act_bits: int = 10, weight_bits: int = 12,
                 nonlinearity: str = "relu", persistent: bool = True) -> None:
        super().__init__()
        self.specs = [tuple(s) for s in specs]
        self.act_bits, self.weight_bits = int(act_bits), int(weight_bits)
        if nonlinearity not in ("relu", "igdn"):
            raise ValueError(f"nonlinearity must be relu or igdn, got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        if not 1 <= self.act_bits <= 16:
            raise ValueError(f"act_bits must be in 1..16, got {act_bits}")
        for transposed, cin, cout, kernel, stride in self.specs:
            if cin * kernel * kernel > self.MAX_TERMS or not 1 <= self.weight_bits <= 15:
                raise ValueError(f"layer {cin}->{cout} (kernel {kernel}) or weight_bits {weight_bits} "
                                 "exceeds the exact float64 range")
        for i in range(len(self.specs)):
            self.register_buffer(f"weight{i}", torch.zeros(0, dtype=torch.int16), persistent=persistent)
            self.register_buffer(f"shift{i}", torch.zeros(0, dtype=torch.int32), persistent=persistent)
            self.register_buffer(f"bias{i}", torch.zeros(0, dtype=torch.int64), persistent=persistent)
            if nonlinearity == "igdn" and i < len(self.specs) - 1:
                self.register_buffer(f"gamma{i}", torch.zeros(0, dtype=torch.int16), persistent=persistent)
                self.register_buffer(f"gamma_shift{i}", torch.zeros(0, dtype=torch.int32), persistent=persistent)
                self.register_buffer(f"beta{i}", torch.zeros(0, dtype=torch.int64), persistent=persistent)

    @property
    def ready(self) -> bool:
        """Whether every integer parameter is there (the last one set by :meth:`quantise_from` completes it)."""
        return all(buf is not None and buf.numel() > 0 for buf in self._buffers.values())

    def clear(self) -> None:
        """Forget the integer parameters (``ready`` becomes False), e.g. when the float weights change."""
        for name, buf in list(self._buffers.items()):
            if buf is not None:
                self._buffers[name] = torch.zeros(0, dtype=buf.dtype, device=buf.device)

    @torch.no_grad()
    def quantise_from(self, layers: list[nn.Module], gdns: list[GDN] | None = None) -> None:
        """Fixed-point copies of the float layers' weights and biases (deterministic: IEEE operations only).

        ``gdns``: the inverse GDNs between the layers, for ``nonlinearity="igdn"``.
        """
        if len(layers) != len(self.specs):
            raise ValueError(f"expected {len(self.specs)} layers, got {len(layers)}")
        if self.nonlinearity == "igdn":
            if gdns is None or len(gdns) != len(self.specs) - 1 or not all(g.inverse for g in gdns):
                raise ValueError(f"expected {len(self.specs) - 1} inverse GDNs between the layers")
            for i, g in enumerate(gdns):
                gamma = g.gamma.detach().double().cpu().clamp_min(g._gamma_bound) ** 2 - g._pedestal
                beta = g.beta.detach().double().cpu().clamp_min(g._beta_bound) ** 2 - g._pedestal
                _, exp = torch.frexp(gamma.abs().amax(1).clamp_min(2.0**-40))
                shift = (self.weight_bits - exp).clamp(0, self.MAX_SHIFT)
                g_int = torch.round(gamma * _pow2(shift).view(-1, 1)).clamp(0, 2.0**self.weight_bits - 1)
                b_int = torch.round(beta * _pow2(shift + self.act_bits)).clamp(0, self.BIAS_LIMIT)
                setattr(self, f"gamma{i}", g_int.to(torch.int16))
                setattr(self, f"gamma_shift{i}", shift.to(torch.int32))
                setattr(self, f"beta{i}", b_int.to(torch.int64))
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

        Runs on the CPU by default, where float64 convolutions are plain multiply-adds; any other
        device computes the same integers (every sum is exact, so its order does not matter).
        """
        if torch.device(device).type == "cuda":  # cuDNN may pick FFT or Winograd algorithms, which round
            with torch.backends.cudnn.flags(enabled=False):
                return self._forward(a, device)
        return self._forward(a, device)

    def _forward(self, a: Tensor, device: str | torch.device) -> Tensor:
        a = a.detach().to(device, torch.float64).clamp(-self.ACT_LIMIT, self.ACT_LIMIT)
        last = len(self.specs) - 1
        for i, (transposed, _, _, kernel, stride) in enumerate(self.specs):
            w = getattr(self, f"weight{i}").to(device, torch.float64)
            bias = getattr(self, f"bias{i}").to(device, torch.float64)  # added inside the convolution: exact too
            if transposed:
                a = F.conv_transpose2d(a, w, bias, stride=stride, padding=kernel // 2, output_padding=stride - 1)
            else:
                a = F.conv2d(a, w, bias, stride=stride, padding=kernel // 2)
            a = a.mul_(_pow2(-getattr(self, f"shift{i}").cpu()).to(device).view(1, -1, 1, 1)).floor_()
            if i == last or self.nonlinearity == "igdn":
                a = a.clamp_(-self.ACT_LIMIT, self.ACT_LIMIT)
                if i < last:
                    a = self._inverse_gdn(a, i, device)
            else:
                a = a.clamp_(0.0, self.ACT_LIMIT)
        return a

    def _inverse_gdn(self, a: Tensor, i: int, device: str | torch.device) -> Tensor:
        """``a·sqrt(β + Σγa²)`` in integers at ``act_bits`` (every intermediate an integer below 2**53)."""
        sq = (a * a).mul_(math.ldexp(1.0, -self.act_bits)).floor_()  # a² at act_bits: |a| <= 2**22, a² exact
        gamma = getattr(self, f"gamma{i}").to(device, torch.float64)
        c = gamma.shape[0]
        beta = getattr(self, f"beta{i}").to(device, torch.float64)
        v = F.conv2d(sq, gamma.view(c, c, 1, 1), beta).clamp_(0.0, self.NORM_LIMIT)  # at 2**(gamma_shift + act_bits)
        del sq
        # the square root's argument at 2 * SQRT_BITS: a power-of-two rescale per channel, then floor
        rescale = 2 * self.SQRT_BITS - self.act_bits - getattr(self, f"gamma_shift{i}").cpu()
        v = v.mul_(_pow2(rescale).to(device).view(1, -1, 1, 1)).floor_().clamp_(0.0, 2.0**52)
        r = torch.sqrt(v).floor_()
        r = r.sub_((r * r).gt_(v))  # an exact integer square root, whatever sqrt's last bit
        r = r.add_((r + 1).square_().le_(v))
        del v
        return r.mul_(a).mul_(math.ldexp(1.0, -self.SQRT_BITS)).floor_().clamp_(-self.ACT_LIMIT, self.ACT_LIMIT)


def _pow2(exponents: Tensor) -> Tensor:
    """Exact float64 powers of two, ``2**e`` per integer ``e`` (``math.ldexp``: no ``pow`` rounding)."""
    return torch.tensor([math.ldexp(1.0, int(e)) for e in exponents.reshape(-1).tolist()],
                        dtype=torch.float64).view(exponents.shape)
