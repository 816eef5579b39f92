"""CUT: contrastive unpaired image translation (Park et al., ECCV 2020).

Three networks, built so that their state dicts have exactly the key names and
shapes of the published ``latest_net_G.pth`` / ``latest_net_D.pth`` /
``latest_net_F.pth`` files (default options: ``resnet_9blocks`` generator,
``basic`` 3-layer PatchGAN, ``mlp_sample`` patch sampler, instance norm,
anti-aliased sampling):

* ``ResnetGenerator`` -- one ``nn.Sequential`` named ``model``: reflection-padded
  7x7 conv, two anti-aliased stride-2 steps, ``n_blocks`` residual blocks, two
  anti-aliased upsampling steps, 7x7 conv, tanh. With 9 blocks the "encoder
  layers" 0, 4, 8, 12, 16 that PatchNCE reads are: the padded input, the two
  convs before each downsampling, and the outputs of residual blocks 1 and 5.
* ``NLayerDiscriminator`` -- the 70x70 PatchGAN, anti-aliased as well.
* ``PatchSampleMLP`` -- per NCE layer ``mlp_<i>`` = Linear-ReLU-Linear to 256.
  The reference creates it lazily on the first batch; here it is built eagerly
  from the generator's channel counts, so its optimizer exists from the start.

The anti-aliasing filters are non-learned but persistent buffers (``*.filt``):
they are in the published files, so they are in ours.

Images are in [-1, 1]; ``to_cut_range`` / ``from_cut_range`` convert from / to
the [0, 1] RGB that the rest of segadapt uses.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as nnf
from torch.func import functional_call

from ..errors import CheckpointError

__all__ = [
    "CUT_FILES", "NCE_LAYERS", "to_cut_range", "from_cut_range", "binomial_filter", "BlurDownsample",
    "BlurUpsample", "ResnetBlock", "ResnetGenerator", "NLayerDiscriminator", "PatchSampleMLP",
    "patch_nce_loss", "lsgan_loss", "CUTModel", "save_cut_weights", "load_cut_weights", "generator_from_file",
]

CUT_FILES = {"G": "latest_net_G.pth", "D": "latest_net_D.pth", "F": "latest_net_F.pth"}
NCE_LAYERS = (0, 4, 8, 12, 16)


def to_cut_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> [-1, 1]."""
    return x * 2.0 - 1.0


def from_cut_range(y: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] RGB (clamped)."""
    return ((y + 1.0) * 0.5).clamp(0.0, 1.0)


def instance_norm(channels: int) -> nn.InstanceNorm2d:
    # CUT's "instance" norm: no affine parameters, no running statistics, hence no state-dict keys
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


# --------------------------------------------------------------------------- anti-aliasing
def binomial_filter(size: int) -> torch.Tensor:
    """(size, size) outer product of the binomial row (1,2,1 / 1,3,3,1 ...), summing to 1."""
    row = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float32)
    filt = row[:, None] * row[None, :]
    return filt / filt.sum()


class BlurDownsample(nn.Module):
    """Blur with the normalised 3x3 [1,2,1] binomial (reflect padding), keep every second pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("filt", binomial_filter(3).expand(channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nnf.conv2d(nnf.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class BlurUpsample(nn.Module):
    """Zero-insertion x2 then the 4x4 [1,3,3,1] binomial (x4 to keep the mean), replicate padding.

    Equal to bilinear x2 upsampling with align_corners=False.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("filt", (binomial_filter(4) * 4.0).expand(channels, 1, 4, 4).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nnf.conv_transpose2d(nnf.pad(x, (1, 1, 1, 1), mode="replicate"), self.filt, stride=2, padding=2,
                                 groups=x.shape[1])
        return y[:, :, 1:-1, 1:-1]


# --------------------------------------------------------------------------- networks
class ResnetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), instance_norm(dim), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), instance_norm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """CUT's ``resnet_9blocks`` generator with ``ngf`` base channels (64 in the paper)."""

    def __init__(self, ngf: int = 64, n_blocks: int = 9, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        # convs carry a bias because instance norm has no affine part (the reference's use_bias)
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7), instance_norm(ngf), nn.ReLU()]
        ch = ngf
        for _ in range(2):  # conv at full resolution, then blur-pool
            layers += [nn.Conv2d(ch, ch * 2, 3, padding=1), instance_norm(ch * 2), nn.ReLU(), BlurDownsample(ch * 2)]
            ch *= 2
        layers += [ResnetBlock(ch) for _ in range(n_blocks)]
        for _ in range(2):  # blur-upsample, then conv
            layers += [BlurUpsample(ch), nn.Conv2d(ch, ch // 2, 3, padding=1), instance_norm(ch // 2), nn.ReLU()]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    @staticmethod
    def num_layers(n_blocks: int) -> int:
        """len(model) for `n_blocks` (stem 4, two downs of 4, the blocks, two ups of 4, head 3),
        without building it (config checks must not draw from the RNG)."""
        return 4 + 2 * 4 + n_blocks + 2 * 4 + 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The translated image and the outputs of `layers` (indices into `model`) on the way."""
        wanted = set(layers)
        feats = []
        for i, layer in enumerate(self.model):
            x = layer(x)
            if i in wanted:
                feats.append(x)
        return x, feats

    def encode(self, x: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """The outputs of `layers` only; stops after the last of them."""
        wanted, last = set(layers), max(layers)
        feats = []
        for i, layer in enumerate(self.model):
            x = layer(x)
            if i in wanted:
                feats.append(x)
            if i == last:
                break
        return feats

    def layer_channels(self, layers: Sequence[int]) -> list[int]:
        """Channel count of each layer's output, read from the architecture (no forward pass)."""
        ch, out = self.model[1].in_channels, []
        for i, layer in enumerate(self.model):
            if isinstance(layer, nn.Conv2d):
                ch = layer.out_channels
            out.append(ch)
        return [out[i] for i in layers]


class NLayerDiscriminator(nn.Module):
    """PatchGAN (70x70 receptive field for 3 layers) with instance norm and blur-pool downsampling."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, padding=1), nn.LeakyReLU(0.2), BlurDownsample(ndf)]
        ch = ndf
        for n in range(1, n_layers):
            out = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(ch, out, 4, padding=1), instance_norm(out), nn.LeakyReLU(0.2), BlurDownsample(out)]
            ch = out
        out = ndf * min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ch, out, 4, padding=1), instance_norm(out), nn.LeakyReLU(0.2),
                   nn.Conv2d(out, 1, 4, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchSampleMLP(nn.Module):
    """CUT's patch sampler ``F``: picks feature vectors at given locations, projects, L2-normalises."""

    def __init__(self, in_channels: Sequence[int], dim: int = 256):
        super().__init__()
        for i, c in enumerate(in_channels):
            self.add_module(f"mlp_{i}", nn.Sequential(nn.Linear(c, dim), nn.ReLU(), nn.Linear(dim, dim)))
        self.num_layers = len(in_channels)

    @staticmethod
    def sample_ids(feats: Sequence[torch.Tensor], num_patches: int) -> list[torch.Tensor]:
        """Per layer, `num_patches` distinct flat locations (fewer if the map is smaller), shared by the batch."""
        ids = []
        for f in feats:
            n = f.shape[2] * f.shape[3]
            ids.append(torch.randperm(n, device=f.device)[: min(num_patches, n)])
        return ids

    def forward(self, feats: Sequence[torch.Tensor], patch_ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """feats: (B, C_l, H_l, W_l) per layer -> (B, P, dim) unit vectors per layer."""
        out = []
        for i, (feat, ids) in enumerate(zip(feats, patch_ids)):
            x = feat.flatten(2)[:, :, ids].transpose(1, 2)
            x = self._modules[f"mlp_{i}"](x)
            out.append(x / (x.norm(dim=-1, keepdim=True) + 1e-7))
        return out


# --------------------------------------------------------------------------- losses
def patch_nce_loss(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """PatchNCE, negatives from the same image only (CUT's default).

    query, key: (B, P, D) unit vectors at the same P locations of each image.
    For patch i of image b: logits = [q_bi . k_bi, q_bi . k_bj (j != i)] / T,
    cross-entropy with the positive at index 0; mean over all B * P patches.
    The keys are constants (detached), as in the reference.
    """
    key = key.detach()
    b, p, _ = query.shape
    pos = (query * key).sum(-1, keepdim=True)
    neg = query @ key.transpose(1, 2)
    # a patch is not its own negative: the reference fills the diagonal with -10
    # (exp(-10 / T) ~ 1e-62, i.e. removed) instead of cutting it out
    eye = torch.eye(p, dtype=torch.bool, device=query.device)
    neg = neg.masked_fill(eye, -10.0)
    logits = torch.cat([pos, neg], dim=-1).flatten(0, 1).float() / temperature
    target = torch.zeros(b * p, dtype=torch.long, device=query.device)
    return nnf.cross_entropy(logits, target)


def lsgan_loss(pred: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN: mean squared distance of the patch scores to 1 (real) or 0 (fake)."""
    pred = pred.float()
    return (pred - 1.0).pow(2).mean() if real else pred.pow(2).mean()


def init_cut_weights(module: nn.Module, gain: float = 0.02) -> None:
    """The reference initialisation ('xavier', gain 0.02): conv/linear weights Xavier-normal, biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- the bundle
class CUTModel(nn.Module):
    """G, D and F with CUT's objectives. Images in [-1, 1].

    ``generator_losses(x_src, x_tgt)`` -> (losses, fake): LSGAN on D(G(x_src)) with
    D's parameters detached (so the generator term never reaches D) and
    PatchNCE(x_src, G(x_src)), plus the identity term PatchNCE(x_tgt, G(x_tgt))
    when ``nce_idt`` (then NCE = 0.5 * (src + idt)). ``fake`` keeps its graph to G.
    ``discriminator_loss(fake, real)``: 0.5 * (LSGAN(D(fake), 0) + LSGAN(D(real), 1)),
    with ``fake`` detached. Both can be summed into one backward; or, CUT's order, D is
    updated in ``generator_losses``' ``before_gan`` hook, so the GAN term sees the updated D.
    """

    def __init__(self, ngf: int = 64, n_blocks: int = 9, ndf: int = 64, n_layers_d: int = 3,
                 nce_layers: Sequence[int] = NCE_LAYERS, num_patches: int = 256, nce_dim: int = 256,
                 nce_temperature: float = 0.07, lambda_gan: float = 1.0, lambda_nce: float = 1.0,
                 nce_idt: bool = True, init_gain: float = 0.02):
        super().__init__()
        self.nce_layers = tuple(int(i) for i in nce_layers)
        self.num_patches = num_patches
        self.nce_temperature = nce_temperature
        self.lambda_gan = lambda_gan
        self.lambda_nce = lambda_nce
        self.nce_idt = nce_idt
        self.G = ResnetGenerator(ngf, n_blocks)
        self.D = NLayerDiscriminator(ndf, n_layers_d)
        self.F = PatchSampleMLP(self.G.layer_channels(self.nce_layers), nce_dim)
        for net in (self.G, self.D, self.F):
            init_cut_weights(net, init_gain)

    def translate(self, x: torch.Tensor) -> torch.Tensor:
        return self.G(x)

    def nce_loss(self, feats_real: Sequence[torch.Tensor], feats_fake: Sequence[torch.Tensor]) -> torch.Tensor:
        """lambda_NCE * mean over layers of PatchNCE(query = fake's patches, key = real's patches)."""
        ids = self.F.sample_ids(feats_real, self.num_patches)
        with torch.no_grad():  # keys are constants in PatchNCE
            keys = self.F([f.detach() for f in feats_real], ids)
        queries = self.F(feats_fake, ids)
        losses = [patch_nce_loss(q, k, self.nce_temperature) for q, k in zip(queries, keys)]
        return self.lambda_nce * torch.stack(losses).mean()

    def generator_losses(self, x_src: torch.Tensor, x_tgt: Optional[torch.Tensor] = None, before_gan=None):
        """`before_gan(fake) -> dict`: called once G has run and before D scores the fake for
        the GAN term (CUT's order: D's update goes there); its entries join the losses."""
        n = x_src.shape[0]
        idt = self.nce_idt and x_tgt is not None
        real = torch.cat([x_src, x_tgt]) if idt else x_src
        # one pass for both domains (instance norm is per image); the encoder
        # features of the real images are PatchNCE's keys
        fake_all, feats_real = self.G.forward_features(real, self.nce_layers)
        fake = fake_all[:n]
        losses = dict(before_gan(fake)) if before_gan is not None else {}
        d_params = {k: p.detach() for k, p in self.D.named_parameters()}
        losses["loss_G_GAN"] = self.lambda_gan * lsgan_loss(functional_call(self.D, d_params, (fake,)), True)
        if self.lambda_nce > 0:
            feats_fake = self.G.encode(fake_all, self.nce_layers)
            nce_src = self.nce_loss([f[:n] for f in feats_real], [f[:n] for f in feats_fake])
            losses["nce_src"] = nce_src.detach()
            if idt:
                nce_idt = self.nce_loss([f[n:] for f in feats_real], [f[n:] for f in feats_fake])
                losses["nce_idt"] = nce_idt.detach()
                losses["loss_NCE"] = 0.5 * (nce_src + nce_idt)
            else:
                losses["loss_NCE"] = nce_src
        return losses, fake

    def discriminator_loss(self, fake: torch.Tensor, real: torch.Tensor) -> dict:
        return {"loss_D_fake": 0.5 * lsgan_loss(self.D(fake.detach()), False),
                "loss_D_real": 0.5 * lsgan_loss(self.D(real), True)}

    def save_weights(self, out_dir) -> dict:
        return save_cut_weights(out_dir, G=self.G, D=self.D, F=self.F)

    def load_weights(self, folder, parts: str = "GDF") -> dict:
        """Load ``latest_net_<X>.pth`` for each X in `parts` from `folder` (a CUT checkpoint folder)."""
        folder = Path(folder)
        paths = {f"{x.lower()}_path": folder / CUT_FILES[x] for x in parts}
        nets = {x: getattr(self, x) for x in parts}
        return load_cut_weights(**nets, **paths)


# --------------------------------------------------------------------------- files
def save_cut_weights(out_dir, G: Optional[nn.Module] = None, D: Optional[nn.Module] = None,
                     F: Optional[nn.Module] = None) -> dict:
    """Write ``latest_net_G/D/F.pth`` (plain CPU state dicts, as CUT saves them) atomically."""
    from ..utils.checkpoint import atomic_save

    written = {}
    for part, net in (("G", G), ("D", D), ("F", F)):
        if net is None:
            continue
        state = OrderedDict((k, v.detach().cpu()) for k, v in net.state_dict().items())
        path = Path(out_dir) / CUT_FILES[part]
        atomic_save(state, path)
        written[part] = path
    return written


def _read_state(path, part: str) -> dict:
    """A CUT file's state dict: ``state_dict`` wrapper and DataParallel ``module.`` prefix removed."""
    from .checkpoints import read_checkpoint

    obj = read_checkpoint(path)  # one-line CheckpointError for a missing / unreadable file
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path}: not a CUT {part} state dict (expected a dict of tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _load_checked(net: nn.Module, path, part: str, state: Optional[dict] = None) -> None:
    """Load `path` (or its already read `state`) into `net`, refusing any key or shape mismatch."""
    from .checkpoints import describe_mismatch

    state = dict(_read_state(path, part) if state is None else state)
    target = net.state_dict()
    modules = dict(net.named_modules())
    # files from old PyTorch versions hold instance-norm statistics that CUT's norm layers do not use
    stale = [k for k in state if k not in target and isinstance(modules.get(k.rpartition(".")[0]), nn.InstanceNorm2d)]
    for k in stale:
        del state[k]
    # the blur filters are constants: a file without them is fine
    missing = [k for k in target if k not in state and not k.endswith(".filt")]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k} file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
              for k, v in state.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"checkpoint {path} does not match the CUT {part} network: "
                              + describe_mismatch(missing, unexpected, shapes))
    net.load_state_dict(state, strict=False)


def load_cut_weights(G: Optional[nn.Module] = None, D: Optional[nn.Module] = None, F: Optional[nn.Module] = None,
                     g_path=None, d_path=None, f_path=None) -> dict:
    """Load CUT files (ours or the published ``latest_net_*.pth``) into the given networks.

    Each network given needs its path and vice versa. Raises ``CheckpointError``
    (one line naming the file) when a file is missing, unreadable, or belongs to
    another architecture (missing / unexpected keys, other shapes).
    """
    loaded = {}
    for part, net, path in (("G", G, g_path), ("D", D, d_path), ("F", F, f_path)):
        if (net is None) != (path is None):
            raise ValueError(f"load_cut_weights: give both {part} and {part.lower()}_path, or neither")
        if net is not None:
            _load_checked(net, path, part)
            loaded[part] = Path(path)
    return loaded


def generator_from_file(path) -> ResnetGenerator:
    """A ``ResnetGenerator`` sized from a G file (``ngf`` from the first conv, the block count
    from the last conv's index) with its weights loaded: CUT files do not store their options.
    ``path`` is a ``latest_net_G.pth`` or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / CUT_FILES["G"]
    state = _read_state(path, "G")
    first = state.get("model.1.weight")
    if first is None or first.dim() != 4 or tuple(first.shape[1:]) != (3, 7, 7):
        raise CheckpointError(f"checkpoint {path}: not a CUT generator (no 7x7 RGB input conv model.1.weight)")
    last_conv = max(int(k.split(".")[1]) for k in state if k.startswith("model.") and k.split(".")[1].isdigit())
    # layers: 4 (stem) + 2 x 4 (down) + n_blocks + 2 x 4 (up) + pad, conv, tanh: the last conv is 21 + n_blocks
    n_blocks = last_conv - 21
    if n_blocks < 0:
        raise CheckpointError(f"checkpoint {path}: not a CUT ResNet generator (last layer index {last_conv})")
    G = ResnetGenerator(int(first.shape[0]), n_blocks)
    _load_checked(G, path, "G", state)
    return G
