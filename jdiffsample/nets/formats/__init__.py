"""The files networks come in and go out as, with no network knowledge: PyTorch pickles read without
torch (:mod:`.torchpickle`, :mod:`.torchfile`), diffusers/transformers folders of safetensors
(:mod:`.diffusers_folder`), the strict matcher of state dicts to Flax parameters (:mod:`.statedict`)
and jdiffsample's own checkpoint folders (:mod:`.checkpoint`)."""
