"""A .npy file's header, read without loading the array: ``np.load`` allocates whatever shape a header declares,
so a file of a few hundred bytes can ask for hundreds of gigabytes. Readers of .npy files a user or a stage
hands over check the declared shape and size here first.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    offset: int  # where the array's bytes start

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(path: str | os.PathLike) -> NpyHeader:
    """The header of the .npy file at ``path``; ValueError (or EOFError, OSError) for one that is not .npy."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        try:
            shape, fortran_order, dtype = read(handle)
        except SyntaxError as error:  # numpy parses the header as a Python literal
            raise ValueError(f"the header does not parse ({error.msg})") from None
        return NpyHeader(tuple(int(side) for side in shape), bool(fortran_order), np.dtype(dtype), handle.tell())
