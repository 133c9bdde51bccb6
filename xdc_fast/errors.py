"""Every error a user can cause (bad flag, bad file, bad dataset), and nothing else.

They live at the bottom of the package so that any module can raise one without importing the layer
that usually reports it (``assign`` and ``export`` need no configuration machinery to refuse an input);
the CLI turns each into one ``Error:`` line and exit status 2. Each class names the kind of input at
fault, so a caller can catch one kind and let the others through.
"""


class XdcError(ValueError):
    """A problem with the user's input, reported before (or instead of) doing the work.

    Subclasses ``ValueError`` so that library callers who caught ``ValueError`` keep working."""


class ConfigError(XdcError):
    """A configuration value (flag, YAML key, preset) that cannot run."""


class DatasetError(XdcError):
    """A dataset that cannot serve the command asked of it (no labels, no such split, no audio...)."""


class FormatError(XdcError):
    """A folder that does not look like the layout asked for with ``--format``."""


class PrepareError(XdcError):
    """``prepare``'s input as a whole cannot be indexed (no media, an output inside the input...)."""


class ShardError(XdcError):
    """A sharded dataset that cannot be written or read as asked."""


class CheckpointError(XdcError):
    """A checkpoint that cannot give the encoder asked for."""


class RoundError(XdcError):
    """A run folder without the round asked for, or a round file that cannot be read back."""


class OutputError(XdcError):
    """An output that cannot be written: no space, no permission, a read-only disk, a path in the way."""


class ReportError(XdcError):
    """A run that cannot be reported on."""


class LoaderError(XdcError):
    """The loader asked for cannot serve here: DALI not installed, a codec its CPU graph cannot decode,
    a pipeline that does not build."""


class StalledError(XdcError):
    """Another rank did not answer a collective within the timeout (raised by ``distributed``)."""


class SubmitError(XdcError):
    """A job that cannot be submitted: no submitit, no SLURM, a malformed time limit."""
