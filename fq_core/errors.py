"""One small error hierarchy; cli.py maps it to one stderr line and an exit status."""


class FqError(Exception):
    """Base of every error the library raises on purpose."""

    exit_status = 2


class BadInput(FqError):
    """The user gave something unusable (a path, an option, a value)."""


class BadModel(BadInput):
    """The file is not a GGUF llama.cpp would accept."""


class BadSelection(BadInput):
    """The --layers / --tensors selection cannot be resolved against the model."""


class BadFormat(BadInput):
    """A tensor cannot be represented in the requested number format."""


class OutputRefused(BadInput):
    """Writing the requested output would lose or corrupt data."""


class FetchFailed(FqError):
    """A model, corpus or source package could not be obtained or verified."""

    exit_status = 1


class CorpusMissing(FetchFailed):
    """No corpus was found locally and it could not be downloaded."""


class LlamaFailed(FqError):
    """A llama.cpp tool crashed, exited non-zero, timed out or printed no usable result."""

    exit_status = 1


class NotDeployable(LlamaFailed):
    """llama.cpp has no kernel for a tensor type in the file (it aborts computing the graph):
    an answer about the file, not a failure of the run."""


class ToolMissing(LlamaFailed):
    """A llama.cpp tool is neither found nor buildable."""


class BuildChanged(ToolMissing):
    """A llama.cpp build's files are not the ones its manifest recorded when it was built."""

    def __init__(self, tree, differences: tuple[str, ...]):
        self.tree = tree
        self.differences = tuple(differences)
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        super().__init__(
            f"the llama.cpp build at {tree} differs from its manifest: {differences[0]}{more}; "
            f"move it aside (mv {tree} {tree}.changed) and run fq setup to rebuild it"
        )
