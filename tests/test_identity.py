"""The one identity: its key covers every part it names, its differences mark what does not
change the numbers, and the identities stored before it (cell records, run manifests) read."""

from __future__ import annotations

import json

import msgspec
import pytest

from fq_core.storage import cell_record, history
from fq_core.storage.identity import Identity, MachineInfo, machine_info

MACHINE = MachineInfo(hostname="h", cpu="Intel Xeon", cores=2, python="3.11.2", platform="Linux")
FULL = Identity(
    variant="deployed",
    model_sha256="a" * 64,
    measured_sha256="b" * 64,
    layers="0",
    tensors=("ffn_norm",),
    format="bf16",
    rounding="truncate",
    seed=1,
    corpus_sha256="c" * 64,
    base_sha256="d" * 64,
    llama_version="v1",
    llama_build_info="gnu",
    llama_build="e" * 64,
    instruction_set="native",
    logits="full precision",
    settings={"ctx": 512, "threads": 2},
    machine=MACHINE,
    fq_version="0.1.0",
    thresholds={"kld_mean_max": 0.02},
)
CHANGED = {
    "variant": "intrinsic",
    "model_sha256": "1" * 64,
    "measured_sha256": "2" * 64,
    "layers": "0-2",
    "tensors": ("attn_norm",),
    "format": "int8",
    "rounding": "nearest",
    "seed": 2,
    "corpus_sha256": "3" * 64,
    "base_sha256": "4" * 64,
    "llama_version": "v2",
    "llama_build_info": "clang",
    "llama_build": "5" * 64,
    "instruction_set": "x86-64-v3",
    "logits": "llama-perplexity 16-bit",
    "settings": {"ctx": 256, "threads": 2},
    "machine": msgspec.structs.replace(MACHINE, cpu="AMD EPYC"),
    "fq_version": "0.2.0",
    "thresholds": {"kld_mean_max": 0.05},
}


@pytest.mark.parametrize("part", sorted(CHANGED))
def test_the_key_covers_every_part_and_a_difference_names_it(part):
    other = msgspec.structs.replace(FULL, **{part: CHANGED[part]})
    assert other.key() != FULL.key()
    found = FULL.differences(other)
    assert len(found) >= 1 and all(d.reference != d.now for d in found)


def test_what_does_not_change_the_numbers_is_marked():
    other = msgspec.structs.replace(
        FULL,
        settings={"ctx": 512, "threads": 8},
        fq_version="0.2.0",
        thresholds={"kld_mean_max": 0.05},
        machine=msgspec.structs.replace(MACHINE, hostname="ci-7", cores=64),
    )
    found = {d.field: d.affects_numbers for d in FULL.differences(other)}
    assert found == {
        "settings.threads": False,
        "fq version": False,
        "thresholds.kld_mean_max": False,
        "host": False,
        "cores": False,
    }
    # the CPU changes a native build's numbers, not those of a fixed instruction-set level
    cpu = msgspec.structs.replace(MACHINE, cpu="AMD EPYC")
    native = FULL.differences(msgspec.structs.replace(FULL, machine=cpu))
    assert [(d.field, d.affects_numbers) for d in native] == [("CPU", True)]
    fixed = msgspec.structs.replace(FULL, instruction_set="x86-64-v3")
    assert [
        d.affects_numbers for d in fixed.differences(msgspec.structs.replace(fixed, machine=cpu))
    ] == [False]


def test_differences_list_what_changes_numbers_first_and_shorten_digests():
    other = msgspec.structs.replace(FULL, fq_version="0.2.0", model_sha256="1" * 64)
    d = FULL.differences(other)
    assert [x.text for x in d] == [
        "model SHA-256 aaaaaaaaaaaa… → 111111111111…",
        "fq version 0.1.0 → 0.2.0",
    ]
    assert FULL.differences(FULL) == ()


def test_unset_parts_are_not_part_of_the_key():
    """A use names what it depends on; an unset part is absent, not a null in the hash."""
    small = Identity(model_sha256="a" * 64, settings={"ctx": 512})
    assert small.to_json() == {"model_sha256": "a" * 64, "settings": {"ctx": 512}}
    assert small.key("baseline") != small.key("treatment")
    assert small.key(length=32) == Identity(settings={"ctx": 512}, model_sha256="a" * 64).key(
        length=32
    )


def test_a_cell_identity_stored_before_the_type_reads_and_writes_back_the_same():
    """sweep.Identity's JSON (fq-suite d29b1ef) is this type's: old shards merge with new."""
    stored = {
        "model_sha256": "a" * 64,
        "measured_sha256": "a" * 64,
        "corpus_sha256": "c" * 64,
        "llama_version": "v1",
        "llama_build": "e" * 64,
        "settings": {
            "ctx": 512,
            "batch": 512,
            "chunks": 8,
            "kld_chunks": 8,
            "engine": "llama-perplexity",
            "placebo_seeds": [1, 2, 3],
            "twin_dtype": None,
        },
    }
    ident = msgspec.json.decode(msgspec.json.encode(stored), type=Identity)
    assert msgspec.json.encode(ident) == msgspec.json.encode(stored)
    assert ident.differences(msgspec.convert(stored, Identity)) == ()


def test_one_machine_type_for_records_cells_and_run_manifests(tmp_path):
    here = machine_info()
    assert here.cores and here.cpu and here.python
    m = history.new_manifest("R1", ["pytest"], cwd=tmp_path)
    assert isinstance(m.host, MachineInfo) and m.host == here
    old = {"hostname": "h", "cpu": "c", "cores": 2, "platform": "Linux", "python": "3.11"}
    assert msgspec.convert(old, MachineInfo).platform == "Linux"  # run.json's older order


def test_a_cell_record_without_machine_information_still_reads(tmp_path):
    """Cell records before MachineInfo could hold `"machine": {}` (the old default)."""
    from test_sweep import _record

    path = cell_record.save_cell(_record(0, [0.01] * 8, [[0.001] * 8]), tmp_path)
    data = json.loads(path.read_text())
    data["machine"] = {}
    path.write_text(json.dumps(data))
    assert cell_record.read_cell(path).machine is None
    data["machine"] = msgspec.to_builtins(MACHINE)
    path.write_text(json.dumps(data))
    assert cell_record.read_cell(path).machine == MACHINE
