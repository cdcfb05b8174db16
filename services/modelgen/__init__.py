"""Random-initialised test models (``pdserve make-model``), since these machines cannot download weights.

- ``preset``: the shapes (``ModelPreset``, ``PRESETS``); a leaf the other modules import.
- ``tokenizer``: the byte-level BPE tokenizer, trained on ``corpus/``.
- ``weights``: seeded random weights, streamed into safetensors files.
- ``build``: ``make_model``, which writes a whole Hugging Face directory.
- ``default_model``: ``resolve_model``, the built-in default model under ``$PDSERVE_HOME``.
- ``cli``: the ``pdserve make-model`` command.

Production code imports only ``default_model.resolve_model``, inside the function that needs it.
"""
