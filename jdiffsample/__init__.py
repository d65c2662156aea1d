"""jdiffsample: fast few-step sampling from pretrained diffusion models in JAX."""

from jdiffsample import models, schedules, timesteps
from jdiffsample.solvers import SOLVERS, sample

__version__ = "0.1.0"
__all__ = ["models", "schedules", "timesteps", "sample", "SOLVERS", "__version__"]
