"""Models from the seed papers built on symfast ops."""
from symfast.models.attention_classifier import AttentionClassifier
from symfast.models.cab_cnn import (CABCNN, BaselineCNN, ClassifierSelect, LogMel, count_parameters,
                                    mel_filterbank)

__all__ = ["AttentionClassifier", "CABCNN", "BaselineCNN", "ClassifierSelect", "LogMel",
           "count_parameters", "mel_filterbank"]
