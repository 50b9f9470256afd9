"""
JSON transforms: a JOLT engine with the semantics of the reference Java
JOLT (see L{harmony.transforms.jolt}).
"""

from harmony.transforms.errors import JoltError, SpecError, TransformError
from harmony.transforms.jolt import OPERATIONS, CompiledSpec, compile_spec, transform

__all__ = ["OPERATIONS", "CompiledSpec", "JoltError", "SpecError", "TransformError", "compile_spec", "transform"]
