"""How a subnetwork is stored: the safetensors reader and writer, the bit-pattern
delta codec, the subnetwork file (versions 1 and 2, its checks), transformers
checkpoints, the saved folder and its model card.
"""
