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


def test_a_model_with_its_own_template_keeps_it(tmp_path, monkeypatch):
    """The GGUF's own tokenizer.chat_template wins over a registry near-copy match: the runner
    passes no --chat-template (llama.cpp applies the model's), and the record names the GGUF."""
    known = dataclasses.replace(
        models.REGISTRY["gemma3-270m"], name="known", architecture=ARCH, n_layers=3
    )
    monkeypatch.setitem(models.REGISTRY, "known", known)
    own = build_gguf(tmp_path, "own.gguf", n_layers=3, seed=1, chat_template="{{ messages }}")
    ref = _ref(own.path)
    assert models.chat_template_of(ref) == (None, "gguf (tokenizer.chat_template)")
    assert template_source(experiment_from(defaults()), ref) == "gguf (tokenizer.chat_template)"


def test_a_chosen_template_is_part_of_the_gate_identity():
    """fq_chat_template changes the generations, so a gate passed without it is not reused
    with it; unset, the identity is the one runs before the setting existed computed."""
    from types import SimpleNamespace

    parts = (
        SimpleNamespace(sha256="m" * 64),
        SimpleNamespace(sha256="c" * 64),
        SimpleNamespace(build_id="b"),
    )
    plain = experiment_from(defaults())
    chosen = experiment_from(dict(defaults(), fq_chat_template="chatml"))
    assert "chat_template" not in plain.settings_json()
    assert chosen.settings_json()["chat_template"] == "chatml"
    assert plain.gate_identity(*parts).key() != chosen.gate_identity(*parts).key()
