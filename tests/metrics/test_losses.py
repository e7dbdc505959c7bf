"""Losses: they optimise, stay finite on empty masks, weight deep supervision as nnU-Net, run in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distseg.losses import LossConfig, build_loss, deep_supervision_weights, soft_dice


def _blob_targets(b: int, k: int, size: int) -> torch.Tensor:
    """Nested square regions (like WT ⊃ TC ⊃ ET), one per channel: (B, K, size, size) float."""
    t = torch.zeros(b, k, size, size)
    for c in range(k):
        lo, hi = 2 + 2 * c, size - 2 - 2 * c
        t[:, c, lo:hi, lo:hi] = 1.0
    return t


@pytest.mark.parametrize("name", ["bce_dice", "ce_dice"])
def test_loss_decreases_when_optimising_logits(name: str) -> None:
    torch.manual_seed(0)
    targets = _blob_targets(2, 3, 16)
    if name == "ce_dice":  # mutually exclusive one-hot classes: background, ring, centre
        fg = targets[:, 0]
        targets = torch.stack([1 - fg, fg - targets[:, 1], targets[:, 1]], dim=1)
    logits = torch.randn_like(targets, requires_grad=True)
    loss_fn = build_loss(LossConfig(name=name))
    opt = torch.optim.Adam([logits], lr=0.1)
    first = loss_fn(logits, targets).item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(logits, targets)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    pred = logits.detach().argmax(1) if name == "ce_dice" else logits.detach() > 0
    expected = targets.argmax(1) if name == "ce_dice" else targets.bool()
    assert (pred == expected).float().mean() > 0.99


def test_tiny_conv_net_learns_a_mask() -> None:
    torch.manual_seed(0)
    targets = _blob_targets(4, 1, 12)
    images = targets + 0.3 * torch.randn_like(targets)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))
    loss_fn = build_loss(LossConfig())
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(net(images), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("batch_dice", [True, False])
def test_empty_masks_give_finite_loss_and_gradients(batch_dice: bool) -> None:
    loss_fn = build_loss(LossConfig(batch_dice=batch_dice))
    targets = torch.zeros(2, 3, 8, 8)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = loss_fn(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # A confident empty prediction of an empty target is (almost) perfect: Dice term ~0, BCE ~0.
    perfect = loss_fn(torch.full((2, 3, 8, 8), -30.0), targets)
    assert 0.0 <= perfect.item() < 1e-3
    # The exact empty/empty soft Dice is 1 thanks to smoothing.
    assert torch.allclose(soft_dice(torch.zeros(2, 3, 8, 8), targets, 1e-5, batch_dice), torch.tensor(1.0))


def test_batch_dice_differs_from_per_sample_dice() -> None:
    torch.manual_seed(1)
    targets = _blob_targets(2, 1, 8)
    targets[1] = 0.0  # one sample empty: per-sample Dice punishes it on its own, batch Dice pools it
    probs = torch.rand(2, 1, 8, 8)
    per_sample = soft_dice(probs, targets, 1e-5, batch_dice=False)
    pooled = soft_dice(probs, targets, 1e-5, batch_dice=True)
    inter = (probs * targets).sum()
    expected = (2 * inter + 1e-5) / (probs.sum() + targets.sum() + 1e-5)
    assert per_sample.shape == (2, 1) and pooled.shape == (1,)
    assert torch.allclose(pooled, expected.reshape(1))
    assert not torch.allclose(per_sample.mean(), pooled.mean())


def test_nnunet_deep_supervision_weights() -> None:
    assert deep_supervision_weights(1) == [1.0]
    for n in (2, 3, 5):
        w = deep_supervision_weights(n)
        raw = [1 / 2**i for i in range(n - 1)]
        assert w[-1] == 0.0
        assert w[:-1] == pytest.approx([r / sum(raw) for r in raw])
        assert sum(w) == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["nearest", "max"])
def test_deep_supervision_combines_scales_with_downsampled_targets(mode: str) -> None:
    torch.manual_seed(2)
    targets = _blob_targets(2, 3, 16)
    outs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    cfg = LossConfig(deep_supervision_downsample=mode)
    single = build_loss(cfg)
    down = [F.interpolate(targets, size=o.shape[2:], mode="nearest") if mode == "nearest"
            else F.adaptive_max_pool2d(targets, o.shape[2:]) for o in outs]
    w = deep_supervision_weights(3)
    expected = sum(wi * single(o, t) for wi, o, t in zip(w, outs, down, strict=True))
    assert torch.allclose(single(outs, targets), expected, atol=1e-6)
    explicit = build_loss(LossConfig(deep_supervision_weights=(1.0, 1.0, 2.0), deep_supervision_downsample=mode))
    expected = sum(wi / 4.0 * single(o, t) for wi, o, t in zip((1.0, 1.0, 2.0), outs, down, strict=True))
    assert torch.allclose(explicit(outs, targets), expected, atol=1e-6)


def test_dropped_scale_still_gets_zero_gradient() -> None:
    targets = _blob_targets(1, 1, 8)
    outs = [torch.randn(1, 1, 8, 8, requires_grad=True), torch.randn(1, 1, 4, 4, requires_grad=True)]
    build_loss(LossConfig())(outs, targets).backward()
    assert outs[1].grad is not None and torch.count_nonzero(outs[1].grad) == 0
    assert torch.count_nonzero(outs[0].grad) > 0


def test_loss_is_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(3)
    targets = _blob_targets(2, 3, 16)
    logits = torch.randn(2, 3, 16, 16)
    loss_fn = build_loss(LossConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = loss_fn(logits.bfloat16(), targets)
    assert bf.dtype == torch.float32
    assert torch.allclose(bf, loss_fn(logits.bfloat16().float(), targets), atol=1e-6)


def test_bad_config_and_shapes_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"loss\.name"):
        build_loss(LossConfig(name="focal"))
    with pytest.raises(ValueError, match=r"loss\.smooth"):
        build_loss(LossConfig(smooth=0))
    with pytest.raises(ValueError, match=r"loss\.deep_supervision_downsample"):
        build_loss(LossConfig(deep_supervision_downsample="linear"))
    loss_fn = build_loss(LossConfig(deep_supervision_weights=(1.0, 0.5)))
    with pytest.raises(ValueError, match=r"deep_supervision_weights.*2 entries.*3 output scales"):
        loss_fn([torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)], torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        build_loss(LossConfig())(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))
