"""tokenizers_vq.kernels"""
