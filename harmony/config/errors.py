# -*- test-case-name: tests.unit.test_config -*-
"""
Configuration errors that name the file and the key path.
"""


class ConfigError(Exception):
    """
    A configuration problem found at startup.

    C{str(error)} reads C{pipelines/dicom.toml: backends.pacs.options.port:
    expected integer, got "abc"}.
    """

    def __init__(self, message, file=None, keypath=()):
        self.message = message
        self.file = file
        self.keypath = tuple(str(k) for k in keypath)
        super().__init__(str(self))

    @property
    def key(self):
        return ".".join(self.keypath)

    def __str__(self):
        parts = []
        if self.file:
            parts.append(str(self.file))
        if self.keypath:
            parts.append(self.key)
        parts.append(self.message)
        return ": ".join(parts)
