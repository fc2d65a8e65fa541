"""Checkpoint I/O: everything that reads or writes files, one module per layer of the format.

A checkpoint folder is a transformers model folder (``config.json`` with a ``quantization_config``
whose ``quant_method`` is ``llmbin``, the tokenizer files, and safetensors weights):

- :mod:`.digests`: the XXH3-128 digest of each stored tensor, kept in every file's header;
- :mod:`.tensors`: one safetensors file: the storage dtype, the ``layers`` description of each
  packed layer, the format version and the digests in its header metadata, verified on read;
- :mod:`.shards`: ``model.safetensors`` or transformers-style shards with their index;
- :mod:`.folder`: the output folder: claimed, written under a temporary name, renamed when whole;
- :mod:`.resume`: ``OUT.partial/``, the finished blocks of an interrupted run;
- :mod:`.io`: a whole checkpoint saved and loaded (``llmbin.save`` and ``llmbin.load``);
- :mod:`.hf_quantizer`: the same files through ``AutoModelForCausalLM.from_pretrained``;
- :mod:`.source`: the source model's own safetensors shards, read one block at a time.

This package's ``__init__`` imports nothing, so that importing one layer never imports the others.
"""
