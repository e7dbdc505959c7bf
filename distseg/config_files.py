"""The experiment YAMLs and DeepSpeed presets that ship with distseg, addressable by name.

The files live in the repository's top-level `configs/` folder. A wheel carries them as `distseg/configs/`
(`setup.py` maps the folder into the package), so an installed distseg finds them beside its own code; a checkout
(editable install, or `PYTHONPATH`) finds `configs/` beside the `distseg/` folder. Either way:

- `--config brats_budget` (or `brats_budget.yaml`) is the shipped `configs/brats_budget.yaml` when no file of that
  name exists where the user points; a path that exists always wins.
- `deepspeed.preset: zero` is the shipped `configs/deepspeed/zero.json`, whatever the current directory; a path to
  a JSON file of one's own is used as given. `configs/deepspeed/<name>.json`, the form older run folders recorded,
  resolves to the shipped file when that path does not exist from the current directory.
"""

from __future__ import annotations

from pathlib import Path

from distseg.typed_config import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent


def configs_dir() -> Path:
    """The folder of shipped configs: `distseg/configs/` in an installed wheel, else the checkout's `configs/`."""
    installed = PACKAGE_DIR / "configs"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "configs"


def available_configs() -> list[str]:
    """Names of the shipped experiment configs (`--config NAME`)."""
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def available_presets() -> list[str]:
    """Names of the shipped DeepSpeed presets (`deepspeed.preset: NAME`)."""
    return sorted(p.stem for p in (configs_dir() / "deepspeed").glob("*.json"))


def _shipped(folder: Path, value: str, suffix: str) -> Path | None:
    """`value` as a file of `folder`: NAME, NAME<suffix> or configs/[deepspeed/]NAME<suffix> (a checkout path)."""
    text = value.replace("\\", "/")
    if text.startswith("configs/"):
        text = text[len("configs/"):]
        if text.startswith("deepspeed/") and folder.name == "deepspeed":
            text = text[len("deepspeed/"):]
    if "/" in text:
        return None
    for candidate in (folder / text, folder / f"{text}{suffix}"):
        if candidate.is_file():
            return candidate
    return None


def resolve_config(value: str | Path) -> Path:
    """The experiment YAML that `--config value` means: an existing file, else the shipped config of that name.
    Raises ConfigError naming the value and the shipped names."""
    path = Path(value)
    if path.is_file():
        return path
    found = _shipped(configs_dir(), str(value), ".yaml")
    if found is not None:
        return found
    raise ConfigError(f"{value}: config file not found; expected a path to a YAML file or the name of a shipped "
                      f"config ({', '.join(available_configs())})")


def resolve_preset(value: str) -> Path:
    """The DeepSpeed JSON that `deepspeed.preset: value` means: a bare name is a shipped preset (zero, zero_gpu);
    anything else is a path, and `configs/deepspeed/NAME.json` falls back to the shipped preset when it does not
    exist from the current directory. Raises ConfigError naming the key, the value and the shipped names."""
    folder = configs_dir() / "deepspeed"
    bare = "/" not in value and "\\" not in value
    found = _shipped(folder, value, ".json") if bare else None
    if found is None and Path(value).is_file():
        found = Path(value)
    if found is None and not bare:
        found = _shipped(folder, value, ".json")
    if found is not None:
        return found
    raise ConfigError(f"deepspeed.preset: no DeepSpeed JSON at {value!r} (relative to {Path.cwd()}); expected a "
                      f"shipped preset name ({', '.join(available_presets())}) or a path to a JSON file")
