"""The one base class of every error a user can cause (bad flag, bad file, bad dataset).

It lives at the bottom of the package so that building blocks (``data``, ``checkpoint``) can raise it
without importing the configuration layer; the CLI turns any of them into one ``Error:`` line and exit 2.
"""


class XdcError(ValueError):
    """A problem with the user's input, reported before (or instead of) doing the work.

    Subclasses ``ValueError`` so that library callers who caught ``ValueError`` keep working."""


class LoaderError(XdcError):
    """The loader asked for cannot serve here: DALI not installed, a codec its CPU graph cannot decode,
    a pipeline that does not build."""


class StalledError(XdcError):
    """Another rank did not answer a collective within the timeout (raised by ``distributed``)."""
