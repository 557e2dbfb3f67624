"""Whether the real file of a treatment runs in llama.cpp: the selected tensors stored as the
format itself (twin.make_real), one chunk of llama-perplexity. A fake-quantized file keeps its
tensors as F32, so it always runs; the file a user would ship stores them as the format, and
llama.cpp's CPU backend has no kernel for some of those (norm weights as BF16 abort with
`binary_op: unsupported types`). Measured once per model, tensors, format and build (cached),
stated by the stage as a check that gates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from .. import __version__
from ..errors import NotDeployable
from ..platform import atomic
from ..storage import cache, codec, results
from ..storage.identity import Identity

if TYPE_CHECKING:
    from ..measurement.models import ModelRef
    from .stages import Context

#: the chunk (of this many tokens) the real file is run on: enough to compute every layer
PROBE_CTX = 128


class Deployability(msgspec.Struct, frozen=True, kw_only=True):
    """`stored`: the format is a type llama.cpp stores (else no real file exists);
    `runs`: llama.cpp ran the real file; `why`: its words when it could not."""

    fmt: str
    stored: bool
    runs: bool | None = None
    why: str | None = None
    ppl: float | None = None  # the real file's PPL over the probe chunk, when it ran
    untried: str | None = None  # why no real file could be written here

    @property
    def sentence(self) -> str:
        if self.untried:
            return f"the real file as {self.fmt} not tried: {self.untried}"
        if not self.stored:
            return f"{self.fmt} is no type llama.cpp stores: the fake file is the only one"
        if self.runs:
            return (
                f"stored as {self.fmt} (the real file), llama.cpp runs it "
                f"(1 chunk of {PROBE_CTX} tokens, PPL {self.ppl:.4g})"
            )
        return f"stored as {self.fmt} (the real file): {self.why}"


def deployability(
    model: ModelRef, names: Sequence[str], fmt: str, ctx: Context
) -> tuple[Deployability, cache.Entry | None]:
    """Make the real file and run one chunk of it (cached by model, tensors, format, build)."""
    from ..measurement import ggml_types

    if fmt not in ggml_types.STORED:
        return Deployability(fmt=fmt, stored=False), None
    if ctx.tools.lib_dir is None:  # tools from PATH or --llama-bin-dir: no ggml to store with
        why = f"the llama.cpp at {ctx.tools.bin_dir} has no {ggml_types.LIBRARY} beside it"
        return Deployability(fmt=fmt, stored=True, untried=why), None
    key = Identity(
        model_sha256=model.sha256,
        tensors=tuple(names),
        format=fmt,
        corpus_sha256=ctx.corpus.sha256,
        llama_build=ctx.tools.build_id,
        fq_version=__version__,
    ).key("deployable", ctx=PROBE_CTX)

    def compute(folder: Path) -> dict:
        from ..measurement import twin

        real = folder / f"{results.safe_name(model.name)}.{fmt}.real.gguf"
        with atomic.owned(real):  # the file lives only while it is run
            twin.make_real(
                model.path,
                real,
                dict.fromkeys(names, fmt),
                lib_dir=ctx.tools.lib_dir,
                force=True,
                fsync=False,
            )
            twin.manifest_path(real).unlink(missing_ok=True)
            try:
                ran = ctx.runner.perplexity(real, ctx.corpus.path, ctx=PROBE_CTX, chunks=1)
            except NotDeployable as exc:
                return msgspec.to_builtins(
                    Deployability(fmt=fmt, stored=True, runs=False, why=str(exc))
                )
        return msgspec.to_builtins(Deployability(fmt=fmt, stored=True, runs=True, ppl=ran.ppl))

    entry = cache.verified(
        "deployable",
        key,
        "deployable.json",
        compute,
        decode=lambda payload: codec.convert(payload, Deployability),
    )
    return entry.value, entry


__all__ = ["PROBE_CTX", "Deployability", "deployability"]
