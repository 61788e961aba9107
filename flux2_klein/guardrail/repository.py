"""The guardrail in a Triton model repository: `REPO/guardrail.json` (the settings with the blocklists'
text inline, so the repository carries everything it serves with) and, when an image classifier is
configured, the `safety` model that checks the output image as the ensemble's last step.

A repository without guardrail.json serves with the defaults (the prompt check with the shipped list).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..specs import Tensor
from ..triton_config import CHECK_OUTPUT, SAFETY_MODEL, python_model
from .settings import GuardrailSettings
from .text import Blocklist, read_blocklist

GUARDRAIL_FILE = "guardrail.json"
# The safety model: the decoded image in, the same image out (or an error); `check_output` (from
# preprocess) false skips the check for a request whose disable_safety_checker the operator allows.
SAFETY_INPUTS = (Tensor("image", "uint8", ("height", "width", 3)), CHECK_OUTPUT)
SAFETY_OUTPUTS = (Tensor("image", "uint8", ("height", "width", 3)),)


def resolve(settings: GuardrailSettings) -> dict:
    """guardrail.json's content; reads and compiles every blocklist now, so that a bad one fails the build."""
    sources = [read_blocklist(b) for b in settings.blocklists] if settings.prompt_check else []
    Blocklist.from_sources(sources)
    return {"settings": settings.to_dict(), "blocklists": [list(s) for s in sources]}


def load(model_dir: str | Path) -> tuple[GuardrailSettings, list[tuple[str, str]] | None]:
    """The settings and blocklist sources a model of the repository serves with (`model_dir`: the model's
    folder, Triton's args["model_repository"]); the defaults when the repository has no guardrail.json."""
    path = Path(model_dir).parent / GUARDRAIL_FILE
    if not path.is_file():
        return GuardrailSettings(), None
    data = json.loads(path.read_text(encoding="utf-8"))
    return GuardrailSettings.from_dict(data["settings"]), [tuple(s) for s in data["blocklists"]]


def safety_config(instances: int = 1, kind: str = "KIND_CPU") -> str:
    return python_model(SAFETY_MODEL, SAFETY_INPUTS, SAFETY_OUTPUTS, instances=instances, kind=kind,
                        optional=(CHECK_OUTPUT.name,))


def write(repo: str | Path, settings: GuardrailSettings, *, instances: int = 1, kind: str = "KIND_CPU",
          validate: bool = True) -> bool:
    """Write guardrail.json and the safety model (or remove a stale one) into `repo`; True when the
    ensemble must end with the safety model. `validate` loads the classifiers once, so that a wrong path
    or label fails here rather than when Triton loads the models."""
    repo = Path(repo)
    resolved = resolve(settings)
    if validate:
        from .core import Guardrail

        Guardrail(settings, resolved["blocklists"])
    repo.mkdir(parents=True, exist_ok=True)
    tmp = repo / f".{GUARDRAIL_FILE}.tmp"
    tmp.write_text(json.dumps(resolved, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(repo / GUARDRAIL_FILE)
    model = repo / SAFETY_MODEL
    if settings.image_classifier is None:
        shutil.rmtree(model, ignore_errors=True)
        return False
    from ..repository import write_model

    write_model(repo, SAFETY_MODEL, safety_config(instances, kind), "safety")
    return True
