import shutil

import pytest

from adapters import cpu_kernels


@pytest.fixture(scope="session")
def lib():
    """The fused CPU kernels' library; skips where no C compiler can build it (the banks then
    use their torch paths), fails where one could and it did not build."""
    so = cpu_kernels.library()
    if so is None and shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine: the banks use their torch paths")
    assert so is not None, "a C compiler is here but the kernels did not build"
    return so
