"""Sub-commands of the ``jdiffsample`` CLI (see ``jdiffsample.cli``): one module per command, each
with ``add_arguments(parser)`` and ``run(args) -> int``, and its one-line help here (so that the CLI
imports only the chosen command's module, and a command's heavy imports cost the others nothing)."""

COMMANDS = {
    "sample": "generate samples into sharded .npz files (deterministic, resumable, multi-device and multi-host)",
    "steps": "optimize a sampling time grid (the error bound of Xue et al. 2024, or learned) and print it as JSON",
    "eval": "compare solvers, NFEs, time grids and Skip-Tuning on a model (digits FD, error, time)",
    "convert": "convert original PyTorch/diffusers weights of a network family into a jdiffsample checkpoint",
    "learn": "learn a learnable solver's parameters (AMED, EPD, PAS) for a model and NFE, into a JSON file",
    "fid": "FID / FD_DINOv2 of images (a run folder, PNG folder or .npz) against reference statistics or images",
}
