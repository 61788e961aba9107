"""Component configs of the released FLUX.2 [klein] models, shipped in the package (geometry only, no
weights): `--config 4b` plans or fakes the real model without a download.

Each JSON holds the diffusers/transformers constructor arguments of `transformer`, `vae` and
`text_encoder` (plus `scheduler` and `pipeline`); real checkpoints carry their own config.json files.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
# Short names accepted wherever a command takes --config; anything else is read as a file path.
NAMED_CONFIGS = {"4b": "flux2-klein-4b.json"}


def config_path(name_or_path: str | Path) -> Path:
    """The JSON file for a shipped config name (`4b`) or a path to one's own file."""
    text = str(name_or_path)
    if text.lower() in NAMED_CONFIGS:
        return CONFIG_DIR / NAMED_CONFIGS[text.lower()]
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(
            f"config: {text!r} is neither a shipped config ({', '.join(NAMED_CONFIGS)}) nor a JSON file")
    return path


__all__ = ["CONFIG_DIR", "NAMED_CONFIGS", "config_path"]
