"""The one exception type that means "the user's input is wrong".

Everything raised as :class:`CurvscopeError` reaches the user as a single line and exit code 2; anything
else is a bug in curvscope.
"""


class CurvscopeError(Exception):
    """Bad input: a missing or corrupt file, a shape mismatch, an unsupported option, ...

    The message is one line that names the file or option and the problem.
    """
