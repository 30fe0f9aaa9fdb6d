"""Datasets: synthetic tasks made on the fly, and loaders for a user's own files."""
from symfast.data.audio import AudioClips, load_wav_folder, read_wav, synthetic_audio, write_wav
from symfast.data.text import TextDataset, TopicDataset, load_text_csv, topic_dataset

__all__ = ["AudioClips", "synthetic_audio", "load_wav_folder", "read_wav", "write_wav",
           "TextDataset", "TopicDataset", "load_text_csv", "topic_dataset"]
