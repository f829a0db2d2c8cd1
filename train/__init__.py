"""tokenizers_vq.train"""
