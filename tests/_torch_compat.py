"""A workaround shared by the tests and the benchmarks that import PyTorch references."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import types


def python_only_torchvision() -> None:
    """Make ``import torchvision`` give its Python modules without its C++ extension.

    The test references (pytorch-fid's Inception, and diffusers/transformers, which import
    torchvision when it is installed) need only torchvision's Python model code, but its compiled
    operators do not load beside the CPU build of torch ("operator torchvision::nms does not
    exist"). Used by tests/conftest.py and benchmarks/forward_vs_torch.py.
    """
    if "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    package = types.ModuleType("torchvision")
    package.__path__ = [os.path.dirname(spec.origin)]
    package.__spec__ = spec
    package.__version__ = importlib.metadata.version("torchvision")
    sys.modules["torchvision"] = package
    try:
        import torchvision.models  # noqa: F401  (only the model definitions)

        package.models = sys.modules["torchvision.models"]
    except ImportError:
        del sys.modules["torchvision"]

