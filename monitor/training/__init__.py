"""Dictionary learning: corpus, activation capture, TopK SAE training, evaluation, feature atlas."""
