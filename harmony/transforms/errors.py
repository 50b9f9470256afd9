# -*- test-case-name: tests.unit.test_jolt -*-
"""
Errors of the JOLT engine: L{SpecError} (a spec that cannot be compiled,
found at startup) and L{TransformError} (a transform that failed on an
input).  Both name the chain operation (index and name) and, for specs,
the key path inside that operation's C{spec}.
"""


def describe_path(path):
    """
    A key path as text: C{spec.rating.*."a.b"[2]} (keys with dots, spaces
    or nothing in them are quoted; list positions in brackets).
    """
    out = "spec"
    for key in path:
        if isinstance(key, int):
            out += f"[{key}]"
        elif key == "" or any(c in key for c in ' ."[]'):
            out += '."' + key.replace('"', '\\"') + '"'
        else:
            out += "." + key
    return out


class JoltError(Exception):
    """
    Base class of the engine's errors.

    @ivar message: what is wrong.
    @ivar path: key path inside the operation's C{spec} (tuple).
    @ivar index: the operation's position in the chain, or C{None}.
    @ivar operation: the operation's name, or C{None}.
    """

    def __init__(self, message, path=(), index=None, operation=None):
        self.message = message
        self.path = tuple(path)
        self.index = index
        self.operation = operation
        super().__init__(str(self))

    def located(self, index, operation):
        """
        A copy of this error naming chain operation C{index}.
        """
        return type(self)(self.message, self.path, index, operation)

    def __str__(self):
        parts = []
        if self.index is not None:
            parts.append(f"operation {self.index} ({self.operation})" if self.operation else f"operation {self.index}")
        if self.path:
            parts.append(describe_path(self.path))
        parts.append(self.message)
        return ": ".join(parts)


class SpecError(JoltError):
    """
    A spec (or chain entry) that cannot be compiled.
    """


class TransformError(JoltError):
    """
    A transform that could not be applied to an input.
    """
