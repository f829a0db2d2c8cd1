"""tokenizers_vq.eval"""
