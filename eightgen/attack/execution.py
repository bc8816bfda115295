"""The model as the optimisation loop runs it: function-preserving rewrites that make its passes faster.

Every rewrite computes the same function and the same input gradient (up to float rounding) and works on a
private copy; the caller's model is never modified.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

LARGE_FEATURE_MAPS = 100.0  # mean conv output area (pixels) from which the CPU runs convolutions channels-last


# --- batch-norm folding ------------------------------------------------------------------------------------


def _foldable(conv: nn.Module | None, bn: nn.Module | None) -> bool:
    """Whether bn is an eval-mode 2-d batch norm with running statistics right behind the convolution conv."""
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
    )


def _plain(module: nn.Module) -> bool:
    """A plain nn.Sequential: its children run one after the other, nothing else."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, bn name) of every convolution whose output goes only through the batch norm after it.

    Found where the data flow is known: adjacent children of a plain nn.Sequential, and convN -> bnN of
    torchvision's resnet blocks. Modules used more than once in the model are left alone.
    """
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    candidates: list[tuple[nn.Module, str, str]] = []
    for parent in model.modules():
        if _plain(parent):
            names = list(parent._modules)
            candidates += [(parent, a, b) for a, b in zip(names, names[1:])]
        elif type(parent).__module__ == "torchvision.models.resnet" and type(parent).__name__ in ("BasicBlock", "Bottleneck"):
            candidates += [(parent, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(parent, f"conv{i}")]
    return [
        (parent, a, b)
        for parent, a, b in candidates
        if _foldable(getattr(parent, a), getattr(parent, b))
        and uses[id(getattr(parent, a))] == 1
        and uses[id(getattr(parent, b))] == 1
    ]


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with every foldable batch norm merged into the convolution before it.

    The copy computes the same function (up to float rounding) with one pass less over every activation in
    each direction; a model with nothing to fold is returned as it is.
    """
    if not _conv_bn_pairs(model):
        return model
    folded = copy.deepcopy(model)
    for parent, conv, bn in _conv_bn_pairs(folded):
        setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)).requires_grad_(False))
        setattr(parent, bn, nn.Identity())
    return folded


# --- sequences: flattening and pooling before the ReLU -----------------------------------------------------


def _leaves(module: nn.Module) -> list[nn.Module]:
    """The modules a plain nn.Sequential runs, nested plain sequences spliced in; [module] for anything else."""
    if _plain(module):
        return [leaf for child in module.children() for leaf in _leaves(child)]
    return [flatten_sequences(module)]


def flatten_sequences(module: nn.Module) -> nn.Module:
    """module, in place, with every plain nn.Sequential inside a plain nn.Sequential spliced into it."""
    if _plain(module):
        return nn.Sequential(*_leaves(module))
    for name, child in list(module.named_children()):
        setattr(module, name, flatten_sequences(child))
    return module


def pool_before_relu(module: nn.Module) -> int:
    """Swap, in place, every ReLU -> MaxPool2d pair of a plain sequence; the number swapped.

    max and ReLU commute (ReLU is monotone, and every pooling window holds an input pixel), and the gradient
    goes to the same arg-max either way, while ReLU and its backward then run on a 4x smaller tensor.
    """
    swapped = 0
    for seq in [m for m in module.modules() if _plain(m)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            relu, pool = seq._modules[a], seq._modules[b]
            if type(relu) is nn.ReLU and type(pool) is nn.MaxPool2d and not pool.return_indices:
                seq._modules[a], seq._modules[b] = pool, relu
                swapped += 1
    return swapped


# --- single-plane convolutions as one matrix product -------------------------------------------------------


class _SinglePlaneConv(torch.autograd.Function):
    """conv2d of a one-channel image whose input gradient is one matrix product and a scatter of its columns.

    Forward: oneDNN for stride 1, where it is fast; for strided kernels (a resnet stem) [patches 1] @ [weight
    bias]^T, patches gathered from a strided view of the padded image (~3x faster), written channels-last when
    asked.
    Backward (to the image only; the loop's weights are frozen): weight^T @ grad_out gives each output pixel's
    kernel-sized patch gradient, summed back onto the image tap by tap.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, geometry: tuple, channels_last: bool) -> Tensor:
        (kh, kw), stride, (ph, pw) = geometry
        n, _, h, w = x.shape
        w2 = weight.reshape(len(weight), kh * kw)
        ctx.save_for_backward(w2)
        ctx.geometry, ctx.size = geometry, (h, w)
        if stride == (1, 1):
            return F.conv2d(x, weight, bias, padding=(ph, pw))
        (sh, sw), c = stride, len(w2)
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        # Allocated in the output layout and filled through a view, so the output is no view (in-place ReLUs stay free).
        if channels_last:
            padded = F.pad(x[:, 0], (pw, pw, ph, ph))
            s_n, s_h, s_w = padded.stride()
            windows = padded.as_strided((n, oh, ow, kh, kw), (s_n, sh * s_h, sw * s_w, s_h, s_w))
            # A column of ones carries the bias through the product: no broadcast copy of it into the output.
            patches = torch.empty((n * oh * ow, kh * kw + 1), dtype=x.dtype, device=x.device)
            patches[:, :-1].view(n, oh, ow, kh, kw).copy_(windows)
            patches[:, -1] = 1.0
            w_bias = torch.cat([w2, torch.zeros_like(w2[:, :1]) if bias is None else bias[:, None]], dim=1)
            out = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
            torch.mm(patches, w_bias.t(), out=out.permute(0, 2, 3, 1).view(-1, c))
            return out
        columns = F.unfold(x, (kh, kw), padding=(ph, pw), stride=stride)  # [n, kh*kw, oh*ow]
        out = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device)
        planes = out.view(n, c, oh * ow)
        torch.matmul(w2, columns, out=planes)
        if bias is not None:
            planes.add_(bias[:, None])
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("single-plane convolution: the loop's weights are frozen; no weight gradient")
        (w2,) = ctx.saved_tensors
        (kh, kw), stride, (ph, pw) = ctx.geometry
        (h, w), (n, c, oh, ow) = ctx.size, grad_out.shape
        if grad_out.is_contiguous(memory_format=torch.channels_last) and not grad_out.is_contiguous():
            g = grad_out.permute(0, 2, 3, 1).reshape(n, oh * ow, c).transpose(1, 2)
        else:
            g = grad_out.reshape(n, c, oh * ow)
        columns = torch.matmul(w2.t(), g)  # [n, kh*kw, oh*ow]: each output pixel's patch gradient
        # Summed back tap by tap: each tap's gradients are one contiguous plane, added to a strided window of the
        # padded image (~1.6x faster than col2im on a 7x7 stride-2 stem).
        (sh, sw), taps = stride, columns.view(n, kh, kw, oh, ow)
        image = torch.zeros((n, h + 2 * ph, w + 2 * pw), dtype=grad_out.dtype, device=grad_out.device)
        for i in range(kh):
            for j in range(kw):
                image[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw] += taps[:, i, j]
        return image[:, None, ph : ph + h, pw : pw + w].contiguous(), None, None, None, None


class ColumnConv2d(nn.Module):
    """A frozen single-input-channel convolution whose input gradient is a matrix product: the same function.

    oneDNN's direct kernels handle one input plane poorly: on a resnet's 7x7 stem, their backward pass to the
    input takes ~10% of the model's time for ~1% of its FLOPs; on the small CNN's first 3x3 layer its backward
    takes 3x its forward. With channels_last a strided convolution's output comes out in that layout.
    """

    def __init__(self, conv: nn.Conv2d, channels_last: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.geometry = (conv.kernel_size, conv.stride, conv.padding)
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        return _SinglePlaneConv.apply(x, self.weight, self.bias, self.geometry, self.channels_last)


class Contiguous(nn.Module):
    """x in the default (row-major NCHW) layout."""

    def forward(self, x: Tensor) -> Tensor:
        return x.contiguous()


def _dense(conv: nn.Module) -> bool:
    """Whether conv is a plain nn.Conv2d: one group, no dilation, numeric zero padding (what the rewrites handle)."""
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def single_plane(conv: nn.Module) -> bool:
    """Whether conv is a plain zero-padded 2-d convolution of one input channel."""
    return _dense(conv) and conv.in_channels == 1


LAYOUT_KEEPING = (nn.Identity, nn.ReLU, nn.MaxPool2d)  # what a channels-last stem output may run through


def _sequence_with_columns(seq: nn.Sequential) -> list[nn.Module]:
    """seq's modules with single-plane convolutions written channels-last and the layout restored after their run."""
    out: list[nn.Module] = []
    pending = False
    for m in seq.children():
        if pending and type(m) not in LAYOUT_KEEPING:
            out.append(Contiguous())
            pending = False
        out.append(ColumnConv2d(m, channels_last=True) if single_plane(m) else m)
        pending = pending or single_plane(m)
    return [*out, Contiguous()] if pending else out


def columns_for_single_planes(net: nn.Module, channels_last: bool) -> None:
    """Replace, in place, every single-plane convolution of net by its matrix-product form.

    In a model that otherwise runs row-major, a plain sequence's strided stem is still written channels-last,
    where the pooling after it is ~10x faster, and the layout goes back after the stem's ReLU and pooling.
    """
    for parent in list(net.modules()):
        if _plain(parent) and not channels_last and any(single_plane(m) for m in parent.children()):
            modules = _sequence_with_columns(parent)
            parent._modules.clear()
            for i, m in enumerate(modules):
                parent.add_module(str(i), m)
        for name, child in list(parent.named_children()):
            if single_plane(child):
                setattr(parent, name, ColumnConv2d(child, channels_last=channels_last))


# --- kernels cut to the taps that reach the image, strided 1x1 convolutions as subsampling ------------------


def _probe(net: nn.Module, image: Tensor, handles: list) -> None:
    """Run net on image without gradients for the hooks behind handles, then remove them."""
    try:
        with torch.no_grad():
            net(image)
    finally:
        for h in handles:
            h.remove()


def _input_sizes(net: nn.Module, image: Tensor, kinds: tuple[type, ...] = (nn.Conv2d,)) -> dict[nn.Module, set[tuple[int, int]]]:
    """The input heights and widths each module of the given kinds sees when net runs on image."""
    sizes: dict[nn.Module, set[tuple[int, int]]] = {}

    def note(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        sizes.setdefault(module, set()).add(tuple(inputs[0].shape[-2:]))

    _probe(net, image, [m.register_forward_pre_hook(note) for m in net.modules() if type(m) in kinds])
    return sizes


def _live_taps(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int, int] | None:
    """(first, last, new padding) of the kernel taps that ever read an image pixel, or None if all do."""
    out = (size + 2 * padding - kernel) // stride + 1
    live = [i for i in range(kernel) if any(0 <= o * stride + i - padding < size for o in range(out))]
    first, last = live[0], live[-1]
    if (first, last) == (0, kernel - 1) or live != list(range(first, last + 1)):
        return None
    cut = padding - first  # the same outputs, from the same pixels, with fewer zero-padding reads
    return (first, last, cut) if cut >= 0 and (size + 2 * cut - (last - first + 1)) // stride + 1 == out else None


def _cut_kernel(conv: nn.Conv2d, size: tuple[int, int]) -> nn.Conv2d | None:
    """conv with the kernel rows and columns that only ever meet zero padding removed; None if there are none."""
    if not _dense(conv):
        return None
    spans = [_live_taps(*args) for args in zip(size, conv.kernel_size, conv.stride, conv.padding)]
    if spans == [None, None]:
        return None
    (r0, r1, rp), (c0, c1, cp) = [span or (0, k - 1, p) for span, k, p in zip(spans, conv.kernel_size, conv.padding)]
    cut = nn.Conv2d(conv.in_channels, conv.out_channels, (r1 - r0 + 1, c1 - c0 + 1), conv.stride, (rp, cp), bias=conv.bias is not None)
    with torch.no_grad():
        cut.weight.copy_(conv.weight[:, :, r0 : r1 + 1, c0 : c1 + 1])
        if conv.bias is not None:
            cut.bias.copy_(conv.bias)
    return cut.requires_grad_(False).to(conv.weight.device)


class Subsample(nn.Module):
    """Every stride-th row and column, made contiguous: what a strided 1x1 convolution reads."""

    def __init__(self, stride: tuple[int, int]) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :: self.stride[0], :: self.stride[1]].contiguous()


class WholeImageConv(nn.Module):
    """A convolution whose kernel covers its whole unpadded input, as what it is: one linear layer, 1x1 output."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1), requires_grad=False)
        self.bias = conv.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.flatten(1), self.weight, self.bias)[:, :, None, None]


def _covers(conv: nn.Conv2d, size: tuple[int, int]) -> bool:
    """Whether conv's kernel is its whole unpadded input (one output pixel, one dot product per channel)."""
    return _dense(conv) and conv.kernel_size == size and conv.padding == (0, 0)


def _unstrided(conv: nn.Conv2d, size: tuple[int, int]) -> nn.Module | None:
    """A strided, unpadded 1x1 convolution as subsampling then the stride-1 convolution (oneDNN's fast case)."""
    if not _dense(conv) or conv.kernel_size != (1, 1) or conv.stride == (1, 1) or conv.padding != (0, 0):
        return None
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None).requires_grad_(False)
    plain.weight, plain.bias = conv.weight, conv.bias
    sub = tuple((n - 1) // s + 1 for n, s in zip(size, conv.stride))
    return nn.Sequential(Subsample(conv.stride), WholeImageConv(plain) if sub == (1, 1) else plain)


def cut_dead_taps(net: nn.Module, image: Tensor) -> int:
    """Replace, in place, convolutions whose kernel edges only read padding on image-sized inputs; the number cut.

    On a resnet fed 28x28 images the last stage's maps are 1x1: its 3x3 kernels read one live pixel and eight
    padding zeros, so each is a matrix product computing the same sums with 9x fewer operations. A kernel
    left covering its whole input runs as a linear layer (oneDNN's convolution backward is ~5x slower on
    those); strided 1x1 convolutions become subsampling plus a stride-1 one.
    """
    sizes = _input_sizes(net, image)
    done = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Conv2d or len(sizes.get(child, ())) != 1:
                continue
            size = next(iter(sizes[child]))
            cut = _cut_kernel(child, size)
            conv = child if cut is None else cut
            unstrided = _unstrided(conv, size)
            if _covers(conv, size):
                setattr(parent, name, WholeImageConv(conv))
            elif unstrided is not None:
                setattr(parent, name, unstrided)
            else:
                setattr(parent, name, conv)
            done += cut is not None
    return done


# --- the head: pools over single pixels, batch norms before linear layers ---------------------------------

GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def single_pixel_pools(net: nn.Module, image: Tensor) -> int:
    """Replace, in place, global pools whose input is always one pixel (a resnet's last maps on 28x28) by identities."""
    sizes = _input_sizes(net, image, GLOBAL_POOLS)
    done = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in GLOBAL_POOLS and child.output_size in (1, (1, 1)) and sizes.get(child) == {(1, 1)}:
                setattr(parent, name, nn.Identity())
                done += 1
    return done


def _folded_linear(bn: nn.BatchNorm1d, linear: nn.Linear) -> nn.Linear:
    """linear(bn(x)) as one linear layer: W diag(s) x + (W t + b), with bn(x) = s x + t."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    folded = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device)
    with torch.no_grad():
        folded.weight.copy_(linear.weight * scale)
        folded.bias.copy_(linear.weight @ shift + (0 if linear.bias is None else linear.bias))
    return folded.requires_grad_(False)


def fold_linear_batch_norms(net: nn.Module) -> int:
    """Merge, in place, each eval-mode BatchNorm1d of a plain sequence into the Linear after it (eval Dropouts between)."""
    done = 0
    for seq in [m for m in net.modules() if _plain(m)]:
        names = list(seq._modules)
        for i, name in enumerate(names):
            bn = seq._modules[name]
            if type(bn) is not nn.BatchNorm1d or bn.training or bn.running_mean is None:
                continue
            j = i + 1
            while j < len(names) and isinstance(seq._modules[names[j]], nn.Dropout) and not seq._modules[names[j]].training:
                j += 1
            if j < len(names) and type(seq._modules[names[j]]) is nn.Linear:
                seq._modules[names[j]] = _folded_linear(bn, seq._modules[names[j]])
                seq._modules[name] = nn.Identity()
                done += 1
    return done


# --- the plan ----------------------------------------------------------------------------------------------


def mean_feature_map_area(net: nn.Module, image: Tensor) -> float:
    """The FLOP-weighted mean output area (height x width) of net's 2-d convolutions on one image."""
    seen: list[tuple[float, float]] = []

    def note(conv: nn.Module, _: object, out: Tensor) -> None:
        area = out.shape[-1] * out.shape[-2]
        seen.append((area, area * conv.weight.numel()))

    _probe(net, image, [m.register_forward_hook(note) for m in net.modules() if isinstance(m, nn.Conv2d)])
    work = sum(w for _, w in seen)
    return sum(a * w for a, w in seen) / work if work else 0.0


def cpu_plan(model: nn.Module, image: Tensor) -> nn.Module:
    """The eval-mode, frozen model rewritten for the CPU: batch norms folded, pooling before ReLUs, dead kernel
    taps cut, layouts chosen.

    oneDNN's channels-last convolutions beat its blocked-layout ones on large feature maps (the small CNN's
    28x28 and 14x14: ~1.35x) and lose on the 1x1 to 7x7 maps of a resnet on 28x28 inputs (~0.9x), so the
    layout follows the model's mean feature-map area (measured on `image`, one start); single-plane
    convolutions run as matrix products. A model without convolutions, or one that cannot be copied, runs as
    it is.
    """
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return model
    try:
        net = fold_batch_norms(model)
        net = net if net is not model else copy.deepcopy(model)
    except Exception:  # a model that cannot be copied runs as it is
        return model
    net = flatten_sequences(net)
    pool_before_relu(net)
    channels_last = mean_feature_map_area(net, image) >= LARGE_FEATURE_MAPS
    cut_dead_taps(net, image)
    single_pixel_pools(net, image)
    fold_linear_batch_norms(net)
    columns_for_single_planes(net, channels_last)
    return net.to(memory_format=torch.channels_last) if channels_last else net


_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


def _state_key(model: nn.Module, image: Tensor) -> tuple:
    """What a plan depends on: every tensor's storage and in-place version, the modes, the image geometry."""
    tensors = [*model.parameters(), *model.buffers()]
    return (
        tuple((t.data_ptr(), t._version, t.requires_grad) for t in tensors),
        tuple(m.training for m in model.modules()),
        tuple(image.shape[1:]),
        image.dtype,
        image.device,
    )


def plan(model: nn.Module, image: Tensor) -> nn.Module:
    """The model as the loop runs it on image's device: the CPU plan there, batch norms folded elsewhere."""
    return cpu_plan(model, image) if image.device.type == "cpu" else fold_batch_norms(model)


def cached_plan(model: nn.Module, image: Tensor, compile: bool = False) -> nn.Module:
    """plan(model, image), torch.compile'd if asked, reused while the model's tensors, versions and modes are unchanged.

    The loop is called once per chunk of starts; building a resnet's plan (a copy, folding, probe passes)
    costs ~50 ms, a few percent of a 20-step chunk, and a fresh copy would make torch.compile compile again.
    """
    key = (_state_key(model, image), compile)
    hit = _PLANS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    net = plan(model, image)
    if compile:
        net = torch.compile(net)
    if getattr(net, "_orig_mod", net) is not model:  # a value holding its own key would keep the model alive for good
        _PLANS[model] = (key, net)
    return net
