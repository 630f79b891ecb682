"""Audio features per video frame (librosa log-mel, energy, pitch; pocketsphinx visemes;
external DeepSpeech/HuBERT/wav2vec arrays) and the audio encoder."""
