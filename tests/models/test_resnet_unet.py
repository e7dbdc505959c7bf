"""resnet50_unet: torchvision-format weights load from a local file; frozen stages stay frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distseg.models import build_model


def torchvision_resnet50_state() -> dict[str, torch.Tensor]:
    """A state dict with torchvision's resnet50 keys and shapes, written out from its pattern (not from our code):
    layers [3, 4, 6, 3], planes 64·2**i, expansion 4, downsample on the first block of each layer, fc 2048→1000."""
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}

    def conv(key: str, out_ch: int, in_ch: int, k: int) -> None:
        sd[f"{key}.weight"] = torch.randn(out_ch, in_ch, k, k, generator=gen)

    def bn(key: str, c: int) -> None:
        sd[f"{key}.weight"] = torch.rand(c, generator=gen) + 0.5
        sd[f"{key}.bias"] = torch.randn(c, generator=gen)
        sd[f"{key}.running_mean"] = torch.randn(c, generator=gen)
        sd[f"{key}.running_var"] = torch.rand(c, generator=gen) + 0.5
        sd[f"{key}.num_batches_tracked"] = torch.tensor(1234)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, blocks in enumerate([3, 4, 6, 3]):
        planes = 64 * 2**i
        for b in range(blocks):
            p = f"layer{i + 1}.{b}"
            conv(f"{p}.conv1", planes, inplanes, 1)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                conv(f"{p}.downsample.0", planes * 4, inplanes, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    sd["fc.weight"] = torch.randn(1000, 2048, generator=gen)
    sd["fc.bias"] = torch.randn(1000, generator=gen)
    return sd


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = torchvision_resnet50_state()
    path = tmp_path_factory.mktemp("weights") / "resnet50-torchvision.pth"
    torch.save(state, path)
    return path, state


def test_encoder_keys_match_torchvision_exactly(weights_file: tuple[Path, dict]) -> None:
    _, state = weights_file
    with torch.device("meta"):
        model = build_model("resnet50_unet")
    ours = {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("fc.")}
    assert ours == theirs


def test_torchvision_weights_land_in_the_encoder(weights_file: tuple[Path, dict]) -> None:
    path, state = weights_file
    model = build_model("resnet50_unet", encoder_weights=str(path))
    loaded = model.encoder.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(loaded[key], value), key


def test_rgb_stem_adapted_to_four_channels_by_mean(weights_file: tuple[Path, dict]) -> None:
    path, state = weights_file
    model = build_model("resnet50_unet", encoder_weights=str(path), in_channels=4, out_channels=3)
    w = model.encoder.conv1.weight.detach()
    assert w.shape == (64, 4, 7, 7)
    expected = state["conv1.weight"].mean(dim=1) * 3 / 4
    for c in range(4):
        assert torch.allclose(w[:, c], expected, atol=1e-6)
    assert torch.equal(model.encoder.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


def test_weights_file_with_wrong_keys_is_a_clear_error(tmp_path: Path) -> None:
    model_state = build_model("resnet50_unet", "debug").encoder.state_dict()
    broken = dict(model_state)
    del broken["layer2.0.downsample.0.weight"]
    broken["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(ValueError, match=r"missing keys \['layer2.0.downsample.0.weight'\].*unexpected keys "
                                         r"\['layer5.0.conv1.weight'\]"):
        build_model("resnet50_unet", "debug", encoder_weights=str(path))
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        build_model("resnet50_unet", "debug", encoder_weights=str(tmp_path / "no-such.pth"))


def test_debug_encoder_round_trips_through_a_file(tmp_path: Path) -> None:
    src = build_model("resnet50_unet", "debug")
    state = {**src.encoder.state_dict(), "fc.weight": torch.zeros(10, 128), "fc.bias": torch.zeros(10)}
    torch.save(state, tmp_path / "enc.pth")
    dst = build_model("resnet50_unet", "debug", encoder_weights=str(tmp_path / "enc.pth"))
    x = torch.randn(1, 3, 40, 40)
    src.decoder.load_state_dict(dst.decoder.state_dict())
    src.head.load_state_dict(dst.head.state_dict())
    assert torch.allclose(src.eval()(x), dst.eval()(x))


@pytest.mark.parametrize("frozen", [1, 3, 5])
def test_frozen_stages_stay_frozen_through_training(frozen: int) -> None:
    torch.manual_seed(0)
    model = build_model("resnet50_unet", "debug", freeze_encoder_stages=frozen, activation_checkpointing=frozen == 3)
    units = {"stem": [model.encoder.conv1, model.encoder.bn1]} | {
        f"layer{i}": [getattr(model.encoder, f"layer{i}")] for i in range(1, 5)
    }
    names = list(units)
    frozen_mods = [m for n in names[:frozen] for m in units[n]]
    live_mods = [m for n in names[frozen:] for m in units[n]] + [model.decoder]

    def snapshot(mods: list[torch.nn.Module]) -> list[torch.Tensor]:
        return [t.detach().clone() for m in mods for t in [*m.parameters(), *m.buffers()]]

    before_frozen, before_live = snapshot(frozen_mods), snapshot(live_mods)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 37, 45)).square().mean().backward()
        opt.step()
    model.train()  # calling train() again must not wake the frozen BatchNorms
    for m in frozen_mods:
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not bn.training for bn in m.modules() if isinstance(bn, torch.nn.BatchNorm2d))
    assert all(torch.equal(a, b) for a, b in zip(before_frozen, snapshot(frozen_mods), strict=True))
    # Sanity: the rest did train (weights and BatchNorm running stats moved).
    assert not all(torch.equal(a, b) for a, b in zip(before_live, snapshot(live_mods), strict=True))
