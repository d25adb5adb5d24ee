"""NoduleSynth transforms: a framework-free core and thin MONAI / TorchIO / nnU-Net wrappers."""
