"""Every error moe-ir raises on purpose derives from MoeIRError, so the CLI can print it as one line
and exit non-zero without a traceback. Anything else escaping is a bug in moe-ir."""
from __future__ import annotations


class MoeIRError(Exception):
    """Base of all user-facing errors. `exit_code` is what the CLI exits with."""

    exit_code = 1


class SpecError(MoeIRError):
    """A spec that cannot be used: names the file, YAML line and key path, what was expected and found."""

    exit_code = 2

    def __init__(self, message: str, *, path: str = "", line: int | None = None, file: str | None = None):
        self.message = message
        self.path = path
        self.line = line
        self.file = file
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.file or "<spec>"
        if self.line is not None:
            where += f":{self.line}"
        key = f" {self.path}:" if self.path else ""
        # One line by contract (the CLI prints it as is): a key or value quoted from the spec may hold a newline.
        return f"{where}:{key} {self.message}".replace("\r", "\\r").replace("\n", "\\n")

    def located(self, *, file: str | None = None, line: int | None = None) -> "SpecError":
        """The same error with a file and (if it had none) a line filled in."""
        return SpecError(self.message, path=self.path, line=self.line if self.line is not None else line,
                         file=file or self.file)


class UsageError(MoeIRError):
    """A command line that cannot be carried out as written (unknown backend, an option the backend does not
    take): exit 2, like argparse's own usage errors."""

    exit_code = 2


class IRError(MoeIRError):
    """A malformed graph: names the node and carries the printed graph for context."""

    def __init__(self, message: str, *, node: str | None = None, graph_text: str | None = None):
        self.message = message
        self.node = node
        self.graph_text = graph_text
        text = f"node {node}: {message}" if node else message
        if graph_text:
            text += "\n--- graph ---\n" + graph_text
        super().__init__(text)


class PassError(MoeIRError):
    """A pass failed; the message says which pass and which passes ran before it."""


class BackendError(MoeIRError):
    """A backend cannot lower or run this graph (unsupported option, missing dependency, bad artifact)."""


class BackendUnavailable(BackendError):
    """This machine cannot run the backend (a package, the hardware or a runtime kernel is missing), as
    opposed to the backend rejecting the graph. `moe-ir validate` reports it as skipped with the reason."""


class OutputError(MoeIRError):
    """An output that cannot be written where it was asked for (a folder where a file goes, no permission, a
    full disk, a file name that would leave the output folder); nothing at the destination was changed."""


class WeightsError(MoeIRError):
    """Weights that do not match the graph's parameters: lists missing, unexpected and mis-shaped names."""
