"""Datasets: synthetic tasks made on the fly, and loaders for a user's own files."""
from symfast.data.audio import AudioClips, load_wav_folder, read_wav, synthetic_audio, write_wav
from symfast.data.images import (GaussianMixture, ImageTensorDataset, digits, gaussian_mixture,
                                 image_folder, orbit_augmented, read_image, save_image_grid)
from symfast.data.noisy import NoisyDataset, clean_split
from symfast.data.text import TextDataset, TopicDataset, load_text_csv, topic_dataset

__all__ = ["AudioClips", "synthetic_audio", "load_wav_folder", "read_wav", "write_wav",
           "TextDataset", "TopicDataset", "load_text_csv", "topic_dataset",
           "ImageTensorDataset", "digits", "orbit_augmented", "image_folder", "save_image_grid",
           "read_image", "GaussianMixture", "gaussian_mixture", "NoisyDataset", "clean_split"]
