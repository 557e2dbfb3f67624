"""Which chat template a model's chat prompt gets, and where it came from."""

from __future__ import annotations

import dataclasses

from gguf_factory import ARCH, build_gguf

from fq_core.definitions.settings import defaults
from fq_core.experiment.protocol import template_source
from fq_core.experiment.stages import experiment_from
from fq_core.measurement import models
from fq_core.platform.hashing import sha256_file


def _ref(path):
    return models.ModelRef(path.stem, path, sha256_file(path), None)


def test_a_near_copy_of_a_registry_model_gets_its_template(tmp_path, monkeypatch):
    """A copy with other bytes (perturbed norms) but the registry model's header: the
    registry's template, and the record's source says so; another shape gets none."""
    known = dataclasses.replace(
        models.REGISTRY["gemma3-270m"], name="known", architecture=ARCH, n_layers=3
    )
    monkeypatch.setitem(models.REGISTRY, "known", known)
    copy = build_gguf(tmp_path, "copy.gguf", n_layers=3, seed=1)
    ref = _ref(copy.path)
    assert ref.sha256 != known.sha256
    assert models.chat_template_of(ref) == (
        "gemma",
        "registry (known: same architecture and layers)",
    )
    other = _ref(build_gguf(tmp_path, "other.gguf", n_layers=2).path)
    assert models.chat_template_of(other) == (None, "none")
    exp = experiment_from(defaults())
    assert template_source(exp, ref) == "registry (known: same architecture and layers)"
    chosen = experiment_from(dict(defaults(), fq_chat_template="chatml"))
    assert chosen.settings.chat_template == "chatml"
    assert template_source(chosen, ref) == "fq_chat_template"
    # the default leaves the baseline key's settings as they were (cache hits)
    assert exp.settings.key_fields()["chat_template"] is None
